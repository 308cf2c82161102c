//! Spans at a real OTLP receiver: names, attributes, the app's trace continued, no credential.

mod support;

use http::Method;
use support::otlp::Receiver;
use support::*;

const SECRET: &str = "sk_live_do_not_export_me";

#[tokio::test]
async fn spans_continue_the_apps_trace_and_never_carry_credentials() {
    let receiver = Receiver::start().await;
    let partner = Partner::start().await;
    partner.queue([Reply::Status(503)]);
    let spec = manifest(
        "payments",
        &format!(
            "upstream: {{url: '{}'}}\nretries: {{maxAttempts: 2, backoff: {{base: 1ms, max: 2ms}}}}\ncredentials: {{secretRef: {{name: api, key: token}}, format: 'Bearer {{value}}'}}\ntelemetry: {{redactHeaders: [x-account], accessLog: true}}\nroutes:\n- name: charges\n  match: {{pathPrefix: /v1/charges}}",
            partner.url()
        ),
    );
    let sidecar = Sidecar::start_with(
        &spec,
        Options {
            secrets: vec![("api".into(), "token".into(), SECRET.into())],
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
                ("OTEL_SERVICE_NAME".into(), "checkout-sidecar".into()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let resp = sidecar
        .send(
            Method::POST,
            &format!("{}/v1/charges", partner.url()),
            &[
                ("traceparent", &format!("00-{trace_id}-{parent_id}-01")),
                ("idempotency-key", "k1"),
                ("x-account", "acct_secret_value"),
            ],
            "{}",
        )
        .await;
    assert_eq!(resp.status, 200);

    // The partner sees the trace continued: same trace id, a new parent (the attempt span).
    let seen = partner.seen();
    assert_eq!(seen.len(), 2);
    let tp = seen[1].headers["traceparent"].to_str().unwrap().to_string();
    assert!(tp.starts_with(&format!("00-{trace_id}-")), "{tp}");
    assert!(!tp.contains(parent_id));

    let calls = receiver.wait_for("tollgate.call", 1).await;
    let attempts = receiver.wait_for("tollgate.attempt", 2).await;
    let call = &calls[0];
    assert_eq!(call.trace_id, trace_id);
    assert_eq!(
        call.parent_span_id, parent_id,
        "the call span is the app's span's child"
    );
    assert_eq!(call.service_name, "checkout-sidecar");
    let a = &call.attributes;
    assert_eq!(a["tollgate.integration"], "test/payments");
    assert_eq!(a["tollgate.route"], "charges");
    assert_eq!(a["http.request.method"], "POST");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["tollgate.attempts"], "2");
    for at in &attempts {
        assert_eq!(at.trace_id, trace_id);
        assert_eq!(
            at.parent_span_id, call.span_id,
            "attempt spans are children of the call span"
        );
    }
    let codes: Vec<&str> = attempts
        .iter()
        .map(|s| s.attributes["http.response.status_code"].as_str())
        .collect();
    assert!(
        codes.contains(&"503") && codes.contains(&"200"),
        "{codes:?}"
    );
    assert!(
        tp.contains(
            &attempts
                .iter()
                .find(|s| s.attributes["tollgate.attempt"] == "2")
                .unwrap()
                .span_id
        )
    );

    // A sidecar-made answer records its reason.
    sidecar
        .write_kill_switch(
            &spec.replace("routes:", "killSwitch: {enabled: true}\nroutes:"),
            true,
        )
        .await;
    sidecar.get(&format!("{}/v1/charges", partner.url())).await;
    let calls = receiver.wait_for("tollgate.call", 2).await;
    assert!(calls.iter().any(|c| c.attributes.get("tollgate.reason").map(String::as_str) == Some("kill-switch")));

    let lines = tollgate_testkit::wait::eventually_async(
        "access log lines",
        std::time::Duration::from_secs(10),
        async || {
            let lines = sidecar.stdout_lines();
            anyhow::ensure!(lines.len() >= 2, "{lines:?}");
            Ok(lines)
        },
    )
    .await;
    let raw = receiver.raw();
    for secret in [SECRET, "acct_secret_value"] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} exported"
        );
        assert!(!sidecar.log_text().contains(secret), "{secret} logged");
        assert!(
            !lines.join("\n").contains(secret),
            "{secret} in the access log"
        );
    }
    // The access log names the exported call's trace, the app's.
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["trace_id"], trace_id);
    assert_eq!(first["attempts"], 2);
}

/// A collector that takes the connection and never answers: the export queue fills, calls go on
/// being answered, and the spans that find no room are dropped and counted.
#[tokio::test]
async fn a_stuck_collector_drops_spans_and_counts_them_never_the_calls() {
    let collector = tollgate_testkit::tcp::TcpServer::start(|mut s| async move {
        let mut buf = [0u8; 4096];
        while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let partner = Partner::start().await;
    let spec = manifest(
        "payments",
        &format!("upstream: {{url: '{}'}}", partner.url()),
    );
    let sidecar = Sidecar::start_with(
        &spec,
        Options {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.url()),
                ("OTEL_BSP_MAX_QUEUE_SIZE".into(), "4".into()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "10".into()),
                ("OTEL_EXPORTER_OTLP_TIMEOUT".into(), "60000".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    for _ in 0..20 {
        assert_eq!(sidecar.get(&url).await.status, 200);
    }
    // Two spans a call: the first export holds at most a queue's worth, the queue another.
    let m = sidecar
        .wait_metrics("spans dropped", |m| {
            metric(m, "tollgate_spans_dropped_total", &[]) >= 40.0 - 2.0 * 4.0 * 2.0
        })
        .await;
    assert_eq!(
        metric(&m, "tollgate_requests_total", &[("code", "200")]),
        20.0
    );
    assert!(
        collector.accepted() >= 1,
        "the exporter reached the collector"
    );
}
