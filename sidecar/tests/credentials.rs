//! Credentials that manage themselves: rotation windows, against a real partner, through the
//! real sidecar binary.

mod support;

use http::Method;
use support::*;

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
