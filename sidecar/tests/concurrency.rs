//! Concurrency caps (`spec.concurrency`, `spec.routes[].concurrency`) against a real partner
//! that holds its answers, through the real sidecar binary.

mod support;

use std::time::Duration;

use http::Method;
use support::*;
use tollgate_testkit::wait::{eventually_async, until};

fn spec(partner: &Partner, rest: &str) -> String {
    manifest(
        "partner",
        &format!("upstream: {{url: '{}'}}\n{rest}", partner.url()),
    )
}

/// A call the partner answers after `ms` milliseconds, in the background.
fn slow_call(sidecar: &Sidecar, partner: &Partner, ms: u64) -> tokio::task::JoinHandle<u16> {
    let (listen, url) = (
        sidecar.listen,
        format!("{}/v1/slow?delay={ms}", partner.url()),
    );
    tokio::spawn(async move { request(listen, Method::GET, &url, &[], "").await.status })
}

fn cap(m: &str, name: &str, scope: &str) -> f64 {
    metric(
        m,
        name,
        &[
            ("integration", "test/partner"),
            ("route", "default"),
            ("scope", scope),
        ],
    )
}

#[tokio::test]
async fn calls_past_max_in_flight_are_refused_until_a_place_frees() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Echo);
    let sidecar = Sidecar::start(&spec(&partner, "concurrency: {maxInFlight: 2}")).await;

    let held = [
        slow_call(&sidecar, &partner, 1500),
        slow_call(&sidecar, &partner, 1500),
    ];
    until(
        "the partner holds two calls",
        Duration::from_secs(10),
        || partner.count() == 2,
    )
    .await;

    let refused = sidecar.get(&format!("{}/v1/fast", partner.url())).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.reason(), Some("concurrency-limited"));
    assert_eq!(refused.headers["retry-after"], "1");
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("spec.concurrency"), "{message}");
    assert_eq!(
        partner.count(),
        2,
        "the refused call never reached the partner"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        cap(&m, "tollgate_concurrency_in_flight", "integration"),
        2.0,
        "{m}"
    );
    assert_eq!(cap(&m, "tollgate_concurrency_limit", "integration"), 2.0);
    assert_eq!(
        metric(
            &m,
            "tollgate_concurrency_refused_total",
            &[("scope", "integration"), ("cause", "full")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_requests_total",
            &[
                ("outcome", "concurrency-limited"),
                ("code", "429"),
                ("result", "refused")
            ]
        ),
        1.0,
        "{m}"
    );

    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // Places are given back when the answers' bodies end.
    assert_eq!(
        sidecar
            .get(&format!("{}/v1/fast", partner.url()))
            .await
            .status,
        200
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        cap(&m, "tollgate_concurrency_in_flight", "integration"),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn queue_mode_waits_in_line_and_refuses_past_max_queue_depth() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Echo);
    let sidecar = Sidecar::start(&spec(
        &partner,
        "concurrency: {maxInFlight: 1, onLimit: queue, maxQueueDepth: 1, maxQueueWait: 20s}",
    ))
    .await;

    let first = slow_call(&sidecar, &partner, 800);
    until(
        "the partner holds the first call",
        Duration::from_secs(10),
        || partner.count() == 1,
    )
    .await;
    let second = slow_call(&sidecar, &partner, 0);
    let admin = sidecar.admin;
    eventually_async(
        "the second call waits in line",
        Duration::from_secs(10),
        async || {
            let m = tollgate_testkit::request(admin, Method::GET, "/metrics", &[], "")
                .await
                .body;
            anyhow::ensure!(
                cap(&m, "tollgate_concurrency_waiting", "integration") == 1.0,
                "{m}"
            );
            Ok(())
        },
    )
    .await;

    let third = sidecar.get(&format!("{}/v1/fast", partner.url())).await;
    assert_eq!(third.status, 429, "the line is full: {}", third.body);
    assert_eq!(third.reason(), Some("concurrency-limited"));
    assert!(
        third.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxQueueDepth"),
        "{}",
        third.body
    );

    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        second.await.unwrap(),
        200,
        "the waiting call went once a place freed"
    );
    assert_eq!(partner.count(), 2);
    let m = sidecar.metrics().await;
    assert_eq!(
        cap(&m, "tollgate_concurrency_queue_capacity", "integration"),
        1.0,
        "{m}"
    );
    assert_eq!(
        cap(&m, "tollgate_concurrency_waiting", "integration"),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_concurrency_refused_total",
            &[("scope", "integration"), ("cause", "queue-full")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_route_cap_holds_beside_the_integrations() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Echo);
    let sidecar = Sidecar::start(&spec(
        &partner,
        "concurrency: {maxInFlight: 10}\nroutes:\n- name: exports\n  match: {pathPrefix: /v1/slow}\n  concurrency: {maxInFlight: 1}",
    ))
    .await;
    let held = slow_call(&sidecar, &partner, 1000);
    until(
        "the partner holds the export",
        Duration::from_secs(10),
        || partner.count() == 1,
    )
    .await;
    let refused = sidecar
        .get(&format!("{}/v1/slow?delay=0", partner.url()))
        .await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.routes[exports].concurrency"),
        "{}",
        refused.body
    );
    // Other routes still have the integration's places.
    assert_eq!(
        sidecar
            .get(&format!("{}/v1/fast", partner.url()))
            .await
            .status,
        200
    );
    assert_eq!(held.await.unwrap(), 200);
}

#[tokio::test]
async fn the_line_serves_the_priority_header_high_before_normal_before_low() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Echo);
    let sidecar = Sidecar::start(&spec(
        &partner,
        "concurrency: {maxInFlight: 1, onLimit: queue, maxQueueDepth: 5, maxQueueWait: 20s, priorityHeader: X-Priority}",
    ))
    .await;
    let first = slow_call(&sidecar, &partner, 800);
    until(
        "the partner holds the first call",
        Duration::from_secs(10),
        || partner.count() == 1,
    )
    .await;
    let admin = sidecar.admin;
    let mut queued = Vec::new();
    for (n, class) in [(1, "low"), (2, "normal"), (3, "HIGH"), (4, "bogus")] {
        let (listen, url) = (
            sidecar.listen,
            format!("{}/v1/queued/{class}", partner.url()),
        );
        queued.push(tokio::spawn(async move {
            request(listen, Method::GET, &url, &[("x-priority", class)], "")
                .await
                .status
        }));
        eventually_async(
            "the call waits in line",
            Duration::from_secs(10),
            async || {
                let m = tollgate_testkit::request(admin, Method::GET, "/metrics", &[], "")
                    .await
                    .body;
                anyhow::ensure!(
                    cap(&m, "tollgate_concurrency_waiting", "integration") == f64::from(n),
                    "{m}"
                );
                Ok(())
            },
        )
        .await;
    }
    assert_eq!(first.await.unwrap(), 200);
    for q in queued {
        assert_eq!(q.await.unwrap(), 200);
    }
    let order: Vec<String> = partner
        .seen()
        .iter()
        .skip(1)
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        order,
        [
            "/v1/queued/HIGH",
            "/v1/queued/normal",
            "/v1/queued/bogus",
            "/v1/queued/low"
        ],
        "high first, then normal (an unknown class is normal) in arrival order, then low"
    );
    let m = sidecar.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_concurrency_queue_wait_seconds_count",
            &[("scope", "integration")]
        ) >= 4.0,
        "{m}"
    );
}

/// The revision in force, from `tollgate_config_revision_info`.
async fn revision(sidecar: &Sidecar) -> String {
    let m = sidecar.metrics().await;
    m.lines()
        .find(|l| l.starts_with("tollgate_config_revision_info{"))
        .and_then(|l| l.split("revision=\"").nth(1))
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_string()
}

async fn reload(sidecar: &Sidecar, yaml: &str) {
    let before = revision(sidecar).await;
    sidecar.write_config(yaml);
    let admin = sidecar.admin;
    eventually_async(
        "the new revision is in force",
        Duration::from_secs(10),
        async || {
            let m = tollgate_testkit::request(admin, Method::GET, "/metrics", &[], "")
                .await
                .body;
            anyhow::ensure!(!m.contains(&format!("revision=\"{before}\"")), "not yet");
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_new_revision_keeps_an_unchanged_cap_with_its_calls_and_a_changed_cap_starts_empty() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Echo);
    let sidecar = Sidecar::start(&spec(&partner, "concurrency: {maxInFlight: 1}")).await;
    let held = slow_call(&sidecar, &partner, 3000);
    until(
        "the partner holds the call",
        Duration::from_secs(10),
        || partner.count() == 1,
    )
    .await;
    let fast = format!("{}/v1/fast", partner.url());

    // Another field changes; the cap does not: the held call still has the only place.
    reload(
        &sidecar,
        &spec(
            &partner,
            "concurrency: {maxInFlight: 1}\ntimeouts: {total: 20s}",
        ),
    )
    .await;
    assert_eq!(
        sidecar.get(&fast).await.status,
        429,
        "the place is still taken"
    );

    // The cap changes: it starts empty, whatever the old one held.
    reload(
        &sidecar,
        &spec(
            &partner,
            "concurrency: {maxInFlight: 2}\ntimeouts: {total: 20s}",
        ),
    )
    .await;
    assert_eq!(sidecar.get(&fast).await.status, 200);
    assert_eq!(held.await.unwrap(), 200);
}
