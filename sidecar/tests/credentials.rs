//! Credentials that manage themselves: rotation windows, against a real partner, through the
//! real sidecar binary.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Method;
use support::*;
use tollgate_testkit::TokenServer;
use tollgate_testkit::wait::eventually_async;

fn spec(partner: &Partner, rest: &str) -> String {
    manifest(
        "partner",
        &format!("upstream: {{url: '{}'}}\n{rest}", partner.url()),
    )
}

/// A partner that knows only `Bearer <key>`: anything else is 401.
fn accepts_only(partner: &Partner, key: &'static str) {
    let wanted = format!("Bearer {key}");
    partner.script(move |_, seen| {
        if seen.header("authorization") == Some(wanted.as_str()) {
            Reply::ok("welcome")
        } else {
            Reply::Status(401)
        }
    });
}

// === rotation window ===

#[tokio::test]
async fn a_partner_that_knows_only_the_secondary_key_is_served_by_it() {
    let partner = Partner::start().await;
    accepts_only(&partner, "sk_new");
    let sidecar = Sidecar::start_with(
        &spec(
            &partner,
            "credentials: {secretRef: {name: api, key: old}, secondaryRef: {name: api, key: new}, format: 'Bearer {value}'}",
        ),
        Options {
            secrets: vec![
                ("api".into(), "old".into(), "sk_old".into()),
                ("api".into(), "new".into(), "sk_new\n".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    // A GET, and a POST whose body is sent again whole.
    assert_eq!(sidecar.get(&url).await.status, 200);
    let resp = sidecar
        .send(
            Method::POST,
            &url,
            &[("authorization", "Bearer app")],
            "amount=5",
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.body, "welcome");

    let seen = partner.seen();
    let keys: Vec<_> = seen.iter().map(|s| s.header("authorization")).collect();
    assert_eq!(
        keys,
        [
            Some("Bearer sk_old"),
            Some("Bearer sk_new"),
            Some("Bearer sk_old"),
            Some("Bearer sk_new")
        ],
        "primary first, the secondary once after each 401"
    );
    assert_eq!(seen[3].body, "amount=5", "the resent POST carries its body");

    let m = sidecar.metrics().await;
    let key = |k: &str| {
        metric(
            &m,
            "tollgate_credential_key_total",
            &[("integration", "test/partner"), ("key", k)],
        )
    };
    assert_eq!(key("secondary"), 2.0, "{m}");
    assert_eq!(key("primary"), 0.0, "{m}");
    let config = sidecar.admin_get("/config").await.body;
    assert!(config.contains("\"secondaryLoaded\": true"), "{config}");
    for secret in ["sk_old", "sk_new"] {
        assert!(!config.contains(secret), "credential in /config");
        assert!(!m.contains(secret), "credential in /metrics");
        assert!(!sidecar.log_text().contains(secret), "credential in logs");
    }

    // Once the partner takes the primary again, the secondary is no longer used.
    accepts_only(&partner, "sk_old");
    assert_eq!(sidecar.get(&url).await.status, 200);
    assert_eq!(partner.count(), 5, "no second send without a 401");
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_credential_key_total",
            &[("integration", "test/partner"), ("key", "primary")],
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_401_to_both_keys_is_the_partners_answer_and_sent_twice_only() {
    let partner = Partner::start().await;
    accepts_only(&partner, "neither");
    let sidecar = Sidecar::start_with(
        &spec(
            &partner,
            "credentials: {secretRef: {name: api, key: old}, secondaryRef: {name: api, key: new}}\nretries: {maxAttempts: 3}",
        ),
        Options {
            secrets: vec![
                ("api".into(), "old".into(), "a".into()),
                ("api".into(), "new".into(), "b".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.reason(), None, "the partner's own answer");
    assert_eq!(partner.count(), 2, "one send per key, a 401 is not retried");
}

// === OAuth2 client credentials ===

/// A token endpoint that knows client `app`/`s3cret`, and a partner that takes only tokens it
/// issued and that have not expired (any other call is 401 and counted in `invalid`).
async fn oauth_pair() -> (
    Arc<TokenServer>,
    Partner,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let tokens = Arc::new(TokenServer::start("app", "s3cret").await);
    let partner = Partner::start().await;
    let invalid = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (t, n) = (tokens.clone(), invalid.clone());
    partner.script(move |_, seen| {
        if t.is_valid(seen.header("authorization")) {
            Reply::ok("welcome")
        } else {
            n.fetch_add(1, Ordering::Relaxed);
            Reply::Status(401)
        }
    });
    (tokens, partner, invalid)
}

fn oauth_spec(partner: &Partner, tokens: &TokenServer, extra: &str) -> String {
    spec(
        partner,
        &format!(
            "credentials:\n  format: 'Bearer {{value}}'\n  oauth2:\n    tokenUrl: '{}'\n    clientIdRef: {{name: oauth, key: id}}\n    clientSecretRef: {{name: oauth, key: secret}}\n    scopes: [charges.read, charges.write]\n    audience: https://api.example.com\n{extra}",
            tokens.url()
        ),
    )
}

fn oauth_secrets() -> Options {
    Options {
        secrets: vec![
            ("oauth".into(), "id".into(), "app".into()),
            ("oauth".into(), "secret".into(), "s3cret\n".into()),
        ],
        ..Options::default()
    }
}

#[tokio::test]
async fn one_token_fetch_serves_a_hundred_concurrent_calls() {
    let (tokens, partner, invalid) = oauth_pair().await;
    // A slow endpoint: every call arrives while the one fetch is in flight.
    tokens.set_delay(Duration::from_millis(300));
    let sidecar = Sidecar::start_with(&oauth_spec(&partner, &tokens, ""), oauth_secrets()).await;
    let url = format!("{}/v1/charges", partner.url());
    let calls = (0..100).map(|_| sidecar.get(&url));
    let answers = futures::future::join_all(calls).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(tokens.requests(), 1, "one fetch for all waiting calls");
    assert_eq!(partner.count(), 100);
    assert_eq!(invalid.load(Ordering::Relaxed), 0);

    // What the token endpoint got: the grant, HTTP Basic, scopes and audience.
    let grant = &tokens.partner.seen()[0];
    assert_eq!(
        grant.header("authorization"),
        Some("Basic YXBwOnMzY3JldA==")
    );
    let form = tollgate_testkit::oauth::parse_form(&String::from_utf8_lossy(&grant.body));
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(field("grant_type").as_deref(), Some("client_credentials"));
    assert_eq!(
        field("scope").as_deref(),
        Some("charges.read charges.write")
    );
    assert_eq!(
        field("audience").as_deref(),
        Some("https://api.example.com")
    );
    assert_eq!(
        field("client_secret"),
        None,
        "basic: the secret is not in the form"
    );

    // Never in /config, /metrics or the logs.
    let config = sidecar.admin_get("/config").await.body;
    let metrics = sidecar.metrics().await;
    assert!(config.contains("\"loaded\": true"), "{config}");
    assert!(config.contains("clientSecretRef"), "{config}");
    for secret in ["tok-1", "s3cret", "YXBwOnMzY3JldA"] {
        assert!(!config.contains(secret), "{secret} in /config");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
        assert!(!sidecar.log_text().contains(secret), "{secret} in logs");
    }
}

#[tokio::test]
async fn client_secret_in_the_body_when_asked() {
    let (tokens, partner, _) = oauth_pair().await;
    let sidecar = Sidecar::start_with(
        &oauth_spec(&partner, &tokens, "    authMethod: body\n"),
        oauth_secrets(),
    )
    .await;
    assert_eq!(
        sidecar
            .get(&format!("{}/v1/charges", partner.url()))
            .await
            .status,
        200
    );
    let grant = &tokens.partner.seen()[0];
    assert_eq!(grant.header("authorization"), None);
    let body = String::from_utf8_lossy(&grant.body).to_string();
    assert!(
        body.contains("client_id=app&client_secret=s3cret"),
        "{body}"
    );
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    let (tokens, partner, invalid) = oauth_pair().await;
    // Two-second tokens, refreshed when one second is left.
    tokens.set_expires_in(2);
    let sidecar = Sidecar::start_with(
        &oauth_spec(&partner, &tokens, "    refreshBefore: 1s\n"),
        oauth_secrets(),
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    eventually_async("two refreshes", Duration::from_secs(15), async || {
        let a = sidecar.get(&url).await;
        anyhow::ensure!(a.status == 200, "a call failed: {} {}", a.status, a.body);
        anyhow::ensure!(tokens.issued() >= 3, "{} tokens issued", tokens.issued());
        Ok(())
    })
    .await;
    assert_eq!(
        invalid.load(Ordering::Relaxed),
        0,
        "no call ever carried an expired token"
    );
}

#[tokio::test]
async fn a_401_costs_one_refresh_and_one_retry() {
    let (tokens, partner, _) = oauth_pair().await;
    let sidecar = Sidecar::start_with(&oauth_spec(&partner, &tokens, ""), oauth_secrets()).await;
    let url = format!("{}/v1/charges", partner.url());
    assert_eq!(sidecar.get(&url).await.status, 200, "tok-1 is cached");

    // The partner revokes tok-1: calls carrying it get a 401 (a little late, so that they
    // are all in flight with it together).
    let t = tokens.clone();
    partner.script(move |_, seen| {
        let auth = seen.header("authorization");
        if auth == Some("Bearer tok-1") {
            Reply::Delay(Duration::from_millis(300), Box::new(Reply::Status(401)))
        } else if t.is_valid(auth) {
            Reply::ok("welcome")
        } else {
            Reply::Status(401)
        }
    });
    let calls = (0..20).map(|_| sidecar.send(Method::POST, &url, &[], "amount=5"));
    for a in futures::future::join_all(calls).await {
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(
        tokens.issued(),
        2,
        "one refresh for every call that got the 401"
    );
    let seen = partner.seen();
    let with = |t: &str| {
        seen[1..]
            .iter()
            .filter(|s| s.header("authorization") == Some(t))
            .count()
    };
    assert_eq!(with("Bearer tok-2"), 20, "each call served once, by tok-2");
    assert!(with("Bearer tok-1") >= 1, "the 401s came with tok-1");
    assert_eq!(
        seen.len(),
        1 + with("Bearer tok-1") + 20,
        "one more send per 401, nothing else"
    );
    assert!(seen[1..].iter().all(|s| s.body == "amount=5"));
}

#[tokio::test]
async fn a_token_endpoint_outage_ends_in_credential_unavailable_and_heals() {
    let (tokens, partner, invalid) = oauth_pair().await;
    tokens.set_expires_in(2);
    let sidecar = Sidecar::start_with(
        &oauth_spec(&partner, &tokens, "    refreshBefore: 1500ms\n"),
        oauth_secrets(),
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    assert_eq!(sidecar.get(&url).await.status, 200);
    tokens.set_up(false);
    // The old token serves until it expires; then the sidecar answers, the partner sees nothing.
    let refused = eventually_async(
        "credential-unavailable",
        Duration::from_secs(10),
        async || {
            let a = sidecar.get(&url).await;
            match a.status {
                200 => anyhow::bail!("still served with the old token"),
                503 => Ok(a),
                s => panic!("unexpected {s}: {}", a.body),
            }
        },
    )
    .await;
    assert_eq!(refused.reason(), Some("credential-unavailable"));
    let e = &refused.json()["error"];
    assert_eq!(e["integration"], "test/partner");
    assert!(
        e["message"].as_str().unwrap().contains("token endpoint"),
        "{e}"
    );
    let sent = partner.count();
    assert_eq!(
        sidecar.get(&url).await.reason(),
        Some("credential-unavailable")
    );
    assert_eq!(partner.count(), sent, "nothing sent without a token");
    assert_eq!(invalid.load(Ordering::Relaxed), 0, "never an expired token");
    let m = sidecar.metrics().await;
    let failures = metric(
        &m,
        "tollgate_credential_refresh_failures_total",
        &[("integration", "test/partner")],
    );
    assert!(failures >= 1.0, "{m}");
    // Each counted failure asked the endpoint (up to 3 attempts); its breaker keeps the calls
    // that keep coming from hammering it.
    let asked = tokens.requests() - 1;
    assert!(
        failures <= asked as f64,
        "{failures} failures, {asked} requests"
    );
    assert!(asked <= 30, "the token endpoint was asked {asked} times");
    assert!(
        metric(
            &m,
            "tollgate_requests_total",
            &[("outcome", "credential-unavailable"), ("code", "503")]
        ) >= 2.0,
        "{m}"
    );

    // Back: calls are served again without any intervention.
    tokens.set_up(true);
    eventually_async("served again", Duration::from_secs(20), async || {
        let a = sidecar.get(&url).await;
        anyhow::ensure!(a.status == 200, "{} {}", a.status, a.body);
        Ok(())
    })
    .await;
    assert_eq!(invalid.load(Ordering::Relaxed), 0);
}

// === start-up check ===

#[tokio::test]
async fn the_start_up_check_goes_through_the_stack_once_per_credential() {
    let partner = Partner::start().await;
    accepts_only(&partner, "sk_live");
    let sidecar = Sidecar::start_with(
        &spec(
            &partner,
            "credentials: {secretRef: {name: api, key: token}, format: 'Bearer {value}', verify: {path: /v1/account}}",
        ),
        Options {
            secrets: vec![("api".into(), "token".into(), "sk_live".into())],
            ..Options::default()
        },
    )
    .await;
    eventually_async("the check passes", Duration::from_secs(10), async || {
        let log = sidecar.log_text();
        anyhow::ensure!(log.contains("credential check passed"), "{log}");
        Ok(())
    })
    .await;
    assert!(
        sidecar
            .log_text()
            .contains("GET /v1/account: the partner answered 200")
    );
    let seen = partner.seen();
    assert_eq!(seen.len(), 1, "one check");
    assert_eq!(seen[0].path, "/v1/account");
    assert_eq!(seen[0].header("authorization"), Some("Bearer sk_live"));

    // A rotated key the partner refuses: the check runs again and fails, saying why.
    write_secret(&sidecar.secrets_dir(), "api", "token", "sk_revoked");
    eventually_async("the check fails", Duration::from_secs(10), async || {
        let log = sidecar.log_text();
        anyhow::ensure!(log.contains("credential check failed"), "{log}");
        Ok(())
    })
    .await;
    let log = sidecar.log_text();
    assert!(
        log.contains("GET /v1/account: the partner answered 401, not 200"),
        "{log}"
    );
    assert!(!log.contains("sk_revoked") && !log.contains("sk_live"));
    assert_eq!(partner.count(), 2, "once per credential");
}

#[tokio::test]
async fn a_hostile_token_endpoint_is_bounded_and_its_fault_named() {
    let partner = Partner::start().await;
    let endpoint = Partner::start().await;
    let cases = [
        ("x".repeat(200 * 1024), "answer larger than 65536 bytes"),
        (
            r#"{"access_token":5}"#.to_string(),
            "access_token: not a string",
        ),
        (
            r#"{"access_token":"t","expires_in":-3}"#.to_string(),
            "expires_in: not a positive number of seconds",
        ),
        (
            r#"{"access_token":"t","token_type":"mac"}"#.to_string(),
            "token_type: \"mac\" is not Bearer",
        ),
    ];
    for (body, why) in cases {
        endpoint.clear();
        endpoint.script(move |_, _| Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.clone(),
        });
        let tokens_url = format!("{}/token", endpoint.url());
        let sidecar = Sidecar::start_with(
            &spec(
                &partner,
                &format!(
                    "credentials: {{oauth2: {{tokenUrl: '{tokens_url}', clientIdRef: {{name: oauth, key: id}}, clientSecretRef: {{name: oauth, key: secret}}}}}}"
                ),
            ),
            oauth_secrets(),
        )
        .await;
        let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
        assert_eq!(resp.status, 503, "{why}: {}", resp.body);
        assert_eq!(resp.reason(), Some("credential-unavailable"));
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(why), "{why}: {message}");
        assert_eq!(endpoint.count(), 1, "{why}: a bad answer is not retried");
        let log = sidecar.log_text();
        assert!(
            log.contains(why) || log.contains(&why.replace('"', "\\\"")),
            "{why}: logged\n{log}"
        );
    }
    assert_eq!(partner.count(), 0, "never sent unauthenticated");
}

#[tokio::test]
async fn a_call_without_a_token_has_a_span_event_saying_why() {
    let receiver = support::otlp::Receiver::start().await;
    let (tokens, partner, _) = oauth_pair().await;
    tokens.set_up(false);
    let mut options = oauth_secrets();
    options.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()),
    ];
    let sidecar = Sidecar::start_with(&oauth_spec(&partner, &tokens, ""), options).await;
    let refused = sidecar.get(&format!("{}/v1/charges", partner.url())).await;
    assert_eq!(refused.reason(), Some("credential-unavailable"));
    assert_eq!(partner.count(), 0);
    let attempts = receiver.wait_for("tollgate.attempt", 1).await;
    let event = attempts[0]
        .events
        .iter()
        .find(|(name, _)| name == "tollgate.credential_unavailable")
        .unwrap_or_else(|| panic!("no credential event on the attempt span: {attempts:?}"));
    assert!(event.1["reason"].contains("token endpoint"), "{event:?}");
    assert!(
        !String::from_utf8_lossy(&receiver.raw()).contains("s3cret"),
        "the client secret is never exported"
    );
}
