//! The upstream connection pool, seen from the partner: keep-alive reuse, the idle timeout,
//! the per-host connection cap, connection age, and connections the partner closed.

mod support;

use std::time::Duration;

use support::*;
use tollgate_testkit::wait::until;

/// One integration for `url`, no retries: a failed attempt shows as a failed call.
fn spec(url: &str) -> String {
    manifest(
        "partner",
        &format!("upstream: {{url: '{url}'}}\nretries: {{maxAttempts: 1}}"),
    )
}

fn args(args: &[&str]) -> Options {
    Options {
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Options::default()
    }
}

async fn ok(sidecar: &Sidecar, url: &str) {
    let resp = sidecar.get(url).await;
    assert_eq!(
        resp.status,
        200,
        "{url}: {}\n{}",
        resp.body,
        sidecar.log_text()
    );
    assert!(resp.reason().is_none(), "{}", resp.body);
}

#[tokio::test]
async fn sequential_calls_share_one_partner_connection() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(&partner.url())).await;
    for i in 0..20 {
        ok(&sidecar, &format!("{}/v1/things/{i}", partner.url())).await;
    }
    assert_eq!(partner.count(), 20);
    assert_eq!(
        partner.accepted(),
        1,
        "every call on one kept-alive connection"
    );

    // A response without a body (204, HEAD) frees its connection just the same.
    partner.script(|_, _| Reply::Status(204));
    for _ in 0..5 {
        let resp = sidecar.get(&format!("{}/empty", partner.url())).await;
        assert_eq!(resp.status, 204);
    }
    assert_eq!(partner.accepted(), 1);
}

#[tokio::test]
async fn tls_and_pass_through_connections_are_kept_alive_too() {
    let ca = TestCa::new();
    let secure = Partner::start_tls(&ca).await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca.ca_pem).unwrap();
    let port = secure.addr.port();
    // An integration over TLS; `other` is no integration's host: passed through.
    let other = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(&format!("https://localhost:{port}")),
        args(&["--ca-bundle", &ca_file.path().display().to_string()]),
    )
    .await;
    for _ in 0..10 {
        ok(&sidecar, &format!("http://localhost:{port}/v1/secure")).await;
        ok(&sidecar, &format!("{}/plain", other.url())).await;
    }
    assert_eq!((secure.count(), other.count()), (10, 10));
    assert_eq!(secure.accepted(), 1, "one TLS connection for ten calls");
    assert_eq!(
        other.accepted(),
        1,
        "one pass-through connection for ten calls"
    );
}

#[tokio::test]
async fn an_idle_connection_closes_after_the_idle_timeout() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(&partner.url()),
        args(&["--pool-idle-timeout", "300ms"]),
    )
    .await;
    ok(&sidecar, &format!("{}/v1/a", partner.url())).await;
    assert_eq!(partner.accepted(), 1);
    until(
        "the idle connection closed by the sidecar",
        Duration::from_secs(10),
        || partner.open_connections() == 0,
    )
    .await;
    ok(&sidecar, &format!("{}/v1/b", partner.url())).await;
    assert_eq!(
        partner.accepted(),
        2,
        "a new connection after the idle one closed"
    );
}

#[tokio::test]
async fn the_per_host_cap_holds_concurrent_calls_to_it() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Delay(Duration::from_millis(150), Box::new(Reply::ok("slow"))));
    let sidecar =
        Sidecar::start_with(&spec(&partner.url()), args(&["--pool-max-per-host", "2"])).await;
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let (listen, url) = (sidecar.listen, format!("{}/v1/slow/{i}", partner.url()));
            tokio::spawn(async move { request(listen, http::Method::GET, &url, &[], "").await })
        })
        .collect();
    for call in calls {
        let resp = call.await.unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.body, "slow");
    }
    assert_eq!(partner.count(), 10);
    assert_eq!(
        partner.max_open_connections(),
        2,
        "never more than two connections open at once"
    );
    assert_eq!(
        partner.accepted(),
        2,
        "the waiting calls took the freed ones"
    );
}

#[tokio::test]
async fn a_call_waiting_for_a_connection_keeps_its_deadline() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Delay(Duration::from_secs(3), Box::new(Reply::ok("slow"))));
    let spec = manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nretries: {{maxAttempts: 1}}\ntimeouts: {{request: 5s, total: 5s}}\nroutes:\n- name: quick\n  match: {{pathPrefix: /quick}}\n  timeouts: {{request: 300ms, total: 300ms}}",
            partner.url()
        ),
    );
    let sidecar = Sidecar::start_with(&spec, args(&["--pool-max-per-host", "1"])).await;
    let (listen, url) = (sidecar.listen, format!("{}/v1/slow", partner.url()));
    let slow = tokio::spawn(async move { request(listen, http::Method::GET, &url, &[], "").await });
    until(
        "the slow call at the partner",
        Duration::from_secs(10),
        || partner.count() == 1,
    )
    .await;
    // The one connection is busy: this call waits for it, and times out at its own deadline.
    let resp = sidecar.get(&format!("{}/quick", partner.url())).await;
    assert_eq!(resp.status, 504, "{}", resp.body);
    assert_eq!(resp.reason(), Some("timeout"));
    assert_eq!(
        partner.count(),
        1,
        "the waiting call never reached the partner"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(partner.accepted(), 1);
}

#[tokio::test]
async fn connections_older_than_the_ttl_are_replaced() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(&spec(&partner.url()), args(&["--pool-ttl", "300ms"])).await;
    ok(&sidecar, &format!("{}/v1/first", partner.url())).await;
    assert_eq!(partner.accepted(), 1);
    // Calls keep the connection busy; once it is older than the TTL the next call gets a new
    // one, and no call fails on the way.
    tollgate_testkit::eventually_async(
        "a second partner connection",
        Duration::from_secs(10),
        async || {
            ok(&sidecar, &format!("{}/v1/again", partner.url())).await;
            anyhow::ensure!(partner.accepted() >= 2, "still {}", partner.accepted());
            Ok(())
        },
    )
    .await;
    // Idle past the TTL (the idle timeout is 90s): closed.
    until(
        "the aged idle connection closed",
        Duration::from_secs(10),
        || partner.open_connections() == 0,
    )
    .await;
}

#[tokio::test]
async fn a_connection_the_partner_closed_is_not_reused() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(&partner.url())).await;
    for round in 1..=5 {
        ok(&sidecar, &format!("{}/v1/round/{round}", partner.url())).await;
        assert_eq!(partner.accepted(), round);
        partner.close_connections();
        until(
            "the partner's connections closed",
            Duration::from_secs(10),
            || partner.open_connections() == 0,
        )
        .await;
    }
    assert_eq!(partner.count(), 5, "no call failed and none was sent twice");
}

#[tokio::test]
async fn connect_failures_and_resets_stay_apart_for_retries() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Reset);
    let dead = tollgate_testkit::free_addr();
    let retries = |on: &str| {
        format!(
            "retries: {{maxAttempts: 3, backoff: {{base: 1ms, max: 2ms}}, retryOn: [{on}], budget: {{percent: 100, minPerSecond: 100}}}}"
        )
    };
    let config = [
        manifest(
            "resets",
            &format!(
                "upstream: {{url: '{}'}}\n{}",
                partner.url(),
                retries("reset")
            ),
        ),
        manifest(
            "refused",
            &format!("upstream: {{url: 'http://{dead}'}}\n{}", retries("reset")),
        ),
        manifest(
            "refused-retried",
            &format!(
                "upstream: {{url: 'http://localhost:{}'}}\n{}",
                dead.port(),
                retries("connect-error")
            ),
        ),
    ]
    .join("---\n");
    let sidecar = Sidecar::start(&config).await;

    // A partner that drops the connection without answering: a reset, retried.
    let resp = sidecar.get(&format!("{}/v1/reset", partner.url())).await;
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert_eq!(resp.reason(), Some("upstream-unreachable"));
    assert_eq!(
        partner.count(),
        3,
        "a reset is retried under retryOn: [reset]"
    );

    // Nothing listening: a connect failure, which `retryOn: [reset]` does not retry.
    let resp = sidecar.get(&format!("http://{dead}/v1/refused")).await;
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert_eq!(resp.reason(), Some("upstream-unreachable"));
    let resp = sidecar
        .get(&format!("http://localhost:{}/v1/refused", dead.port()))
        .await;
    assert_eq!(resp.reason(), Some("upstream-unreachable"), "{}", resp.body);
    let m = sidecar.metrics().await;
    let retried = |name: &str| {
        metric(
            &m,
            "tollgate_retries_total",
            &[("integration", &format!("test/{name}"))],
        )
    };
    assert_eq!(retried("resets"), 2.0, "{m}");
    assert_eq!(retried("refused"), 0.0, "{m}");
    assert_eq!(retried("refused-retried"), 2.0, "{m}");
}

#[tokio::test]
async fn idle_connections_beyond_the_idle_cap_are_closed() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Delay(Duration::from_millis(500), Box::new(Reply::ok("slow"))));
    let sidecar = Sidecar::start_with(
        &spec(&partner.url()),
        args(&["--pool-max-idle-per-host", "1"]),
    )
    .await;
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let (listen, url) = (sidecar.listen, format!("{}/v1/slow/{i}", partner.url()));
            tokio::spawn(async move { request(listen, http::Method::GET, &url, &[], "").await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().status, 200);
    }
    assert_eq!(
        partner.accepted(),
        3,
        "three calls at once, three connections"
    );
    until("one idle connection kept", Duration::from_secs(10), || {
        partner.open_connections() == 1
    })
    .await;
}
