//! Quotas that track the partner, through the real sidecar binary: adaptive quotas
//! (`rateLimit.adaptive`) against a real partner that starts throttling, per-partition
//! overrides (`rateLimit.overrides`) and composite partition keys (`partitionAlsoBy`,
//! `partitionByClientAddress`).

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use support::*;
use tollgate_testkit::wait::eventually_async;

/// A partner that, while `limited`, answers 429 past `per_second` calls in each wall-clock
/// second, and records how many calls it got and let through per second.
struct Throttling {
    limited: Arc<AtomicBool>,
    /// (second since start, calls, answered 200).
    series: Arc<Mutex<Vec<(u64, usize, usize)>>>,
}

fn throttling(partner: &Partner, per_second: usize) -> Throttling {
    let limited = Arc::new(AtomicBool::new(true));
    let series: Arc<Mutex<Vec<(u64, usize, usize)>>> = Arc::default();
    let start = Instant::now();
    let in_second = Arc::new(AtomicUsize::new(0));
    let (l, s) = (limited.clone(), series.clone());
    partner.script(move |_, _| {
        let second = start.elapsed().as_secs();
        let mut series = s.lock().unwrap();
        if series.last().is_none_or(|(sec, _, _)| *sec != second) {
            series.push((second, 0, 0));
            in_second.store(0, Ordering::SeqCst);
        }
        let n = in_second.fetch_add(1, Ordering::SeqCst) + 1;
        let last = series.last_mut().unwrap();
        last.1 += 1;
        if l.load(Ordering::SeqCst) && n > per_second {
            Reply::Status(429)
        } else {
            last.2 += 1;
            Reply::ok("ok")
        }
    });
    Throttling { limited, series }
}

fn effective(m: &str) -> f64 {
    metric(
        m,
        "tollgate_rate_limit_effective_rate",
        &[("quota", "integration"), ("band", "second")],
    )
}

#[tokio::test]
async fn the_rate_falls_under_a_throttling_partners_limit_and_climbs_back_when_it_lifts() {
    let partner = Partner::start().await;
    let t = throttling(&partner, 50);
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nrateLimit: {{scope: perPod, limits: [{{name: second, requests: 100, per: 1s}}], adaptive: {{minPercent: 20, recovery: 20s}}}}",
            partner.url()
        ),
    ))
    .await;

    // The app asks for 100 calls a second, more than the partner now takes.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, listen, url) = (
            stop.clone(),
            sidecar.listen,
            format!("{}/v1/x", partner.url()),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                request(listen, Method::GET, &url, &[], "").await;
            }
        })
    };

    let admin = sidecar.admin;
    let metrics = async move || {
        tollgate_testkit::request(admin, Method::GET, "/metrics", &[], "")
            .await
            .body
    };
    let started = Instant::now();
    eventually_async(
        "the rate in force falls to at most 50/s",
        Duration::from_secs(10),
        async || {
            let m = metrics().await;
            anyhow::ensure!(
                m.contains("tollgate_rate_limit_effective_rate{"),
                "the partner has not throttled yet"
            );
            anyhow::ensure!(effective(&m) <= 50.0, "{}", effective(&m));
            Ok(())
        },
    )
    .await;
    eprintln!(
        "adaptive: at most 50/s in force {:.1?} after the partner started throttling",
        started.elapsed()
    );
    let m = metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_rate_limit_throttle_signals_total",
            &[("quota", "integration")]
        ) >= 1.0,
        "{m}"
    );
    // Settled: over the next three seconds the partner gets about what it takes (AIMD keeps
    // probing upward, so each halving is preceded by a few calls over).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = partner.count();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reached = partner.count() - before;
    let per_second = reached as f64 / window.elapsed().as_secs_f64();
    eprintln!("adaptive: the partner got {per_second:.1} calls/s while throttling at 50/s");
    assert!(
        per_second <= 55.0,
        "{per_second:.1}/s reached a partner that takes 50/s"
    );

    // The partner lifts its limit: the rate climbs back to the configured 100/s.
    t.limited.store(false, Ordering::SeqCst);
    let lifted = Instant::now();
    eventually_async(
        "the rate in force climbs back to 100/s",
        Duration::from_secs(40),
        async || {
            let m = metrics().await;
            anyhow::ensure!(effective(&m) >= 100.0, "{}", effective(&m));
            Ok(())
        },
    )
    .await;
    eprintln!(
        "adaptive: back to 100/s {:.1?} after the partner lifted its limit",
        lifted.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    for (second, calls, ok) in t.series.lock().unwrap().iter() {
        eprintln!(
            "adaptive: second {second:>2}: {calls:>3} calls reached the partner, {ok:>3} answered 200"
        );
    }
}

#[tokio::test]
async fn overridden_partition_values_get_their_own_bands() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nrateLimit:\n  partitionBy: X-Region\n  limits: [{{name: other, requests: 1, per: 1h}}]\n  overrides:\n  - values: [eu, uk]\n    limits: [{{name: europe, requests: 3, per: 1h}}]\n  - values: [us]\n    limits: [{{name: americas, requests: 2, per: 1h}}]",
            partner.url()
        ),
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    let call = async |region: Option<&str>| {
        let headers: Vec<(&str, &str)> = region.map(|r| ("x-region", r)).into_iter().collect();
        request(sidecar.listen, Method::GET, &url, &headers, "").await
    };
    for _ in 0..3 {
        assert_eq!(call(Some("eu")).await.status, 200);
    }
    let refused = call(Some("eu")).await;
    assert_eq!(refused.status, 429);
    assert!(refused.body.contains("europe"), "{}", refused.body);
    // Each value has its own buckets, even when they share an override.
    assert_eq!(call(Some("uk")).await.status, 200);
    for _ in 0..2 {
        assert_eq!(call(Some("us")).await.status, 200);
    }
    let refused = call(Some("us")).await;
    assert_eq!(refused.status, 429);
    assert!(refused.body.contains("americas"), "{}", refused.body);
    // Any other value, and no header, get the quota's own bands.
    assert_eq!(call(Some("apac")).await.status, 200);
    assert_eq!(call(Some("apac")).await.status, 429);
    assert_eq!(call(None).await.status, 200);
    assert_eq!(call(None).await.status, 429);
    assert_eq!(partner.count(), 3 + 1 + 2 + 1 + 1);
}

/// `partitionAlsoBy`: each combination of region and tenant has its own buckets (a missing
/// header counts as a value of its own, and no two combinations collide); an overridden region
/// keeps its bands, divided by tenant too. A refusal names every header of the key and echoes
/// no value.
#[tokio::test]
async fn composite_partition_keys_give_each_combination_its_own_buckets() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nrateLimit:\n  partitionBy: X-Region\n  partitionAlsoBy: [X-Tenant]\n  limits: [{{name: other, requests: 1, per: 1h}}]\n  overrides:\n  - values: [eu]\n    limits: [{{name: europe, requests: 2, per: 1h}}]",
            partner.url()
        ),
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    let call = async |region: Option<&str>, tenant: Option<&str>| {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        headers.extend(region.map(|r| ("x-region", r)));
        headers.extend(tenant.map(|t| ("x-tenant", t)));
        request(sidecar.listen, Method::GET, &url, &headers, "").await
    };
    // The quota's own band (1/h) per (region, tenant).
    assert_eq!(call(Some("us"), Some("acme")).await.status, 200);
    let refused = call(Some("us"), Some("acme")).await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.body.contains("header x-region and x-tenant") && !refused.body.contains("acme"),
        "{}",
        refused.body
    );
    assert_eq!(call(Some("us"), Some("globex")).await.status, 200);
    assert_eq!(call(Some("us"), None).await.status, 200);
    assert_eq!(call(None, Some("acme")).await.status, 200);
    // Values that would run together if concatenated are different keys.
    assert_eq!(call(Some("usa"), Some("cme")).await.status, 200);
    // The overridden region: its own band (2/h), for each tenant.
    for tenant in ["acme", "globex"] {
        for _ in 0..2 {
            assert_eq!(call(Some("eu"), Some(tenant)).await.status, 200);
        }
        let refused = call(Some("eu"), Some(tenant)).await;
        assert_eq!(refused.status, 429);
        assert!(refused.body.contains("europe"), "{}", refused.body);
    }
    assert_eq!(partner.count(), 5 + 4);
}

/// `GET url` through the sidecar's proxy from a connection bound to `from` (any 127/8 address
/// is this machine): the status code.
async fn status_from(proxy: std::net::SocketAddr, from: [u8; 4], url: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(from), 0).into())
        .unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    let host = url.split('/').nth(2).unwrap_or_default();
    let head =
        format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nX-Region: eu\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `partitionByClientAddress`: each client host has its own buckets, after the headers of the
/// key (a sidecar shared by several hosts); a refusal names the client address as part of the
/// key, never the address itself.
#[tokio::test]
async fn the_client_address_can_join_the_partition_key() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nrateLimit:\n  partitionBy: X-Region\n  partitionByClientAddress: true\n  limits: [{{name: per-host, requests: 2, per: 1h}}]",
            partner.url()
        ),
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    for _ in 0..2 {
        assert_eq!(status_from(sidecar.listen, [127, 0, 0, 1], &url).await, 200);
    }
    assert_eq!(status_from(sidecar.listen, [127, 0, 0, 1], &url).await, 429);
    // Another host, same header: buckets of its own.
    for _ in 0..2 {
        assert_eq!(status_from(sidecar.listen, [127, 0, 0, 2], &url).await, 200);
    }
    assert_eq!(status_from(sidecar.listen, [127, 0, 0, 2], &url).await, 429);
    let refused = request(sidecar.listen, Method::GET, &url, &[("x-region", "eu")], "").await;
    assert_eq!(refused.status, 429);
    assert!(
        refused
            .body
            .contains("header x-region and the client address")
            && !refused.body.contains("127.0.0.1"),
        "{}",
        refused.body
    );
    assert_eq!(partner.count(), 4);
}
