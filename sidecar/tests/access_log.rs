//! The access log (`spec.telemetry.accessLog`): one JSON line per call on stdout with what
//! identifies the call and how it ended, never a header; nothing when it is off.

mod support;

use std::time::Duration;

use http::Method;
use support::*;
use tollgate_testkit::wait::eventually_async;

const SECRET: &str = "sk_live_never_in_the_access_log";

fn spec(partner: &Partner, access_log: bool) -> String {
    manifest(
        "payments",
        &format!(
            "upstream: {{url: '{}'}}\nretries: {{maxAttempts: 2, backoff: {{base: 1ms, max: 2ms}}}}\ncredentials: {{secretRef: {{name: api, key: token}}, format: 'Bearer {{value}}'}}\ntelemetry: {{redactHeaders: [x-account], accessLog: {access_log}}}\nroutes:\n- name: charges\n  match: {{pathPrefix: /v1/charges}}",
            partner.url()
        ),
    )
}

fn options() -> Options {
    Options {
        secrets: vec![("api".into(), "token".into(), SECRET.into())],
        ..Options::default()
    }
}

#[tokio::test]
async fn one_json_line_per_call_without_headers() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(&spec(&partner, true), options()).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";

    // A call retried once (503 then 200), then a partner's 404 on the default route.
    partner.queue([Reply::Status(503)]);
    let resp = sidecar
        .send(
            Method::POST,
            &format!("{}/v1/charges/ch_1?api_key=query_secret", partner.url()),
            &[
                ("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01")),
                ("idempotency-key", "k1"),
                ("x-account", "acct_secret_value"),
                ("authorization", "Bearer app_secret"),
            ],
            "{}",
        )
        .await;
    assert_eq!(resp.status, 200);
    partner.queue([Reply::Status(404)]);
    assert_eq!(sidecar.status_of(&partner, "/v2/other").await, 404);

    let lines = eventually_async(
        "two access log lines",
        Duration::from_secs(10),
        async || {
            let lines = sidecar.stdout_lines();
            anyhow::ensure!(lines.len() >= 2, "{lines:?}");
            Ok(lines)
        },
    )
    .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "attempts",
        "duration_ms",
        "integration",
        "method",
        "outcome",
        "path",
        "route",
        "status",
        "trace_id",
    ];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want, "{first}");
    assert_eq!(first["integration"], "test/payments");
    assert_eq!(first["route"], "charges");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v1/charges/ch_1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["attempts"], 2);
    assert_eq!(first["outcome"], "success");
    assert_eq!(first["trace_id"], trace_id);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0, "{first}");

    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["route"], "default");
    assert_eq!(second["method"], "GET");
    assert_eq!(second["status"], 404);
    assert_eq!(second["attempts"], 1);
    assert_eq!(second["outcome"], "partner-error");
    assert_eq!(second["trace_id"], serde_json::Value::Null);

    // A call the sidecar answers itself is logged too, with its reason as the outcome.
    sidecar
        .write_kill_switch(
            &spec(&partner, true).replace("routes:", "killSwitch: {enabled: true}\nroutes:"),
            true,
        )
        .await;
    assert_eq!(sidecar.status_of(&partner, "/v1/charges").await, 503);
    let lines = eventually_async("a third line", Duration::from_secs(10), async || {
        let lines = sidecar.stdout_lines();
        anyhow::ensure!(lines.len() >= 3, "{lines:?}");
        Ok(lines)
    })
    .await;
    let third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(third["outcome"], "kill-switch");
    assert_eq!(third["attempts"], 0);

    let all = lines.join("\n");
    for secret in [
        SECRET,
        "acct_secret_value",
        "app_secret",
        "query_secret",
        "idempotency",
    ] {
        assert!(!all.contains(secret), "{secret} in the access log:\n{all}");
    }
}

#[tokio::test]
async fn off_by_default_prints_nothing() {
    let partner = Partner::start().await;
    let spec = manifest(
        "payments",
        &format!("upstream: {{url: '{}'}}", partner.url()),
    );
    let sidecar = Sidecar::start(&spec).await;
    for _ in 0..3 {
        assert_eq!(sidecar.status_of(&partner, "/x").await, 200);
    }
    // The calls are recorded (metrics are written at the same moment as an access line).
    sidecar
        .wait_metrics("three calls", |m| {
            metric(
                m,
                "tollgate_requests_total",
                &[("integration", "test/payments")],
            ) == 3.0
        })
        .await;
    // Explicitly off too.
    let off = Sidecar::start_with(&spec_off(&partner), options()).await;
    assert_eq!(off.get(&format!("{}/x", partner.url())).await.status, 200);
    off.wait_metrics("one call", |m| {
        metric(
            m,
            "tollgate_requests_total",
            &[("integration", "test/payments")],
        ) == 1.0
    })
    .await;
    assert_eq!(sidecar.stdout_lines(), Vec::<String>::new());
    assert_eq!(off.stdout_lines(), Vec::<String>::new());
}

fn spec_off(partner: &Partner) -> String {
    spec(partner, false)
}
