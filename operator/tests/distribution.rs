//! The distribution endpoint over real sockets and TLS, with the sidecar's own cluster client
//! on the other end. TokenReview and Pods come from an in-process fake API server.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tollgate_crds::distribution::{BreakerState, IntegrationReport, SecretValue, Snapshot};
use tollgate_operator::catalog::{CatalogHandle, Credential, Entry};
use tollgate_operator::distribution::{HubSettings, ServerLimits};
use tollgate_sidecar::cluster::{ClusterClient, ConnectionState};
use tollgate_testkit::{ServingCert, metric, until};

use support::{OperatorProcess, TokenKind, fixture, free_addr};

const WAIT: Duration = Duration::from_secs(10);

fn settings() -> HubSettings {
    HubSettings {
        heartbeat: Duration::from_secs(1),
        report_interval: Duration::from_secs(1),
        ..HubSettings::default()
    }
}

/// A PartnerIntegration as the controller would put it in force.
fn entry(
    ns: &str,
    name: &str,
    generation: i64,
    spec: serde_json::Value,
    secret: Option<&str>,
) -> Entry {
    let spec: tollgate_crds::PartnerIntegrationSpec = serde_json::from_value(spec).unwrap();
    let policy = tollgate_crds::compile(ns, name, &spec).unwrap();
    Entry::new(
        generation,
        spec,
        policy,
        secret.map(|v| Credential {
            value: SecretValue::new(v),
            secret_version: format!("rv-{v}"),
            secret_name: "stripe-api".into(),
            allowed_hosts: None,
            certificate: None,
        }),
    )
}

fn stripe(kill: bool) -> serde_json::Value {
    json!({
        "workloadSelector": {"matchLabels": {"app": "checkout"}},
        "upstream": {"url": "https://api.stripe.com"},
        "killSwitch": {"enabled": kill, "reason": "INC-1"},
        "credentials": {"secretRef": {"name": "stripe-api", "key": "apiKey"}, "format": "Bearer {value}"},
    })
}

/// A catalog holding `payments/stripe` at generation 1.
fn stripe_catalog() -> CatalogHandle {
    let catalog = CatalogHandle::new();
    catalog.upsert(stripe_entry(1, false, "sk_live_1"));
    catalog
}

/// `payments/stripe` at `generation`, its kill switch `kill`, its credential `key`.
fn stripe_entry(generation: i64, kill: bool, key: &str) -> Entry {
    entry("payments", "stripe", generation, stripe(kill), Some(key))
}

/// The operator ends `s`'s stream and refuses its reconnect with `status`: a new revision
/// does not reach it, and the end is counted with `reason`.
async fn ended_and_refused(
    op: &OperatorProcess,
    catalog: &CatalogHandle,
    s: &mut Sidecar,
    status: &str,
    reason: &str,
) {
    until("the session closed", WAIT, || op.hub.session_count() == 0).await;
    s.state_matches(|st| {
        matches!(st, ConnectionState::Disconnected { .. }) && format!("{st:?}").contains(status)
    })
    .await;
    catalog.upsert(stripe_entry(2, false, "sk_live_2"));
    s.quiet(Duration::from_millis(500)).await;
    assert!(
        metric(
            &op.metrics.encode(),
            "tollgate_operator_streams_ended_total",
            &[("reason", reason)]
        ) >= 1.0
    );
}

fn global_quota() -> serde_json::Value {
    json!({
        "upstream": {"url": "http://partner.internal:8080"},
        "rateLimit": {"scope": "global", "limits": [{"name": "burst", "requests": 10, "per": "1s"}]},
    })
}

struct Sidecar {
    snapshots: mpsc::UnboundedReceiver<Snapshot>,
    state: watch::Receiver<ConnectionState>,
    task: tokio::task::JoinHandle<()>,
    reports: Arc<Mutex<Vec<IntegrationReport>>>,
}

impl Sidecar {
    fn start(
        addr: std::net::SocketAddr,
        certs: &ServingCert,
        dir: &std::path::Path,
        ns: &str,
        pod: &str,
        token: &str,
    ) -> Self {
        let token_file = dir.join(format!("{ns}-{pod}.token"));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut config = support::cluster_config(
            addr,
            certs.ca_file.clone(),
            token_file,
            ns,
            pod,
            dir.join(format!("{ns}-{pod}.snapshot.json")),
        );
        config.backoff_base = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(300);
        let (tx, snapshots) = mpsc::unbounded_channel();
        let reports: Arc<Mutex<Vec<IntegrationReport>>> = Arc::default();
        let r = reports.clone();
        let client = ClusterClient::new(
            config,
            Arc::new(move |s: &Snapshot| {
                let _ = tx.send(s.clone());
                Ok(())
            }),
            Arc::new(move || r.lock().unwrap().clone()),
        );
        let state = client.state();
        let task = tokio::spawn(client.run());
        Self {
            snapshots,
            state,
            task,
            reports,
        }
    }

    async fn next(&mut self) -> Snapshot {
        tokio::time::timeout(WAIT, self.snapshots.recv())
            .await
            .expect("a snapshot in time")
            .expect("client alive")
    }

    /// No snapshot arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(s)) = tokio::time::timeout(d, self.snapshots.recv()).await {
            panic!("unexpected snapshot {s:?}");
        }
    }

    async fn state_matches(&mut self, f: impl Fn(&ConnectionState) -> bool) -> ConnectionState {
        tokio::time::timeout(WAIT, self.state.wait_for(|s| f(s)))
            .await
            .expect("state in time")
            .expect("client alive")
            .clone()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_change_reaches_both_sidecars() {
    let (dir, certs, api) = fixture();
    let t1 = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let t2 = api.add_pod("payments", "checkout-2", &[("app", "checkout")]);
    let catalog = stripe_catalog();
    let addr = free_addr();
    let op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());

    let mut a = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &t1);
    let mut b = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-2", &t2);
    for s in [&mut a, &mut b] {
        let snap = s.next().await;
        assert_eq!(snap.revision, 1);
        assert_eq!(snap.integrations.len(), 1);
        let i = &snap.integrations[0];
        assert_eq!(
            (i.namespace.as_str(), i.name.as_str()),
            ("payments", "stripe")
        );
        assert_eq!(i.credential.as_ref().map(|c| c.expose()), Some("sk_live_1"));
        assert!(!i.spec.kill_switch.as_ref().unwrap().enabled);
        assert_eq!(i.quota_share, None);
    }

    // Kill switch on: pushed to both, as revision 2.
    catalog.upsert(stripe_entry(2, true, "sk_live_1"));
    for s in [&mut a, &mut b] {
        let snap = s.next().await;
        assert_eq!(snap.revision, 2);
        assert!(
            snap.integrations[0]
                .spec
                .kill_switch
                .as_ref()
                .unwrap()
                .enabled
        );
        assert_eq!(snap.integrations[0].generation, 2);
    }
    // The acks reach the operator and are timed. Each is its own request on the connection, so
    // an ack of revision 2 may overtake the ack of revision 1 and settle both with one
    // observation: two to four observations in all.
    until("two push latencies observed", WAIT, || {
        metric(
            &op.metrics.encode(),
            "tollgate_operator_push_latency_seconds_count",
            &[],
        ) >= 2.0
    })
    .await;
    let observed = metric(
        &op.metrics.encode(),
        "tollgate_operator_push_latency_seconds_count",
        &[],
    );
    assert!((2.0..=4.0).contains(&observed), "{observed}");
    assert_eq!(op.metrics.connected_sidecars.get(), 2);

    // Reports come back on the same connection and land in the integration's traffic.
    let rev = catalog
        .get(&("payments".into(), "stripe".into()))
        .unwrap()
        .config_revision
        .clone();
    for s in [&a, &b] {
        *s.reports.lock().unwrap() = vec![IntegrationReport {
            namespace: "payments".into(),
            name: "stripe".into(),
            config_revision: rev.clone(),
            interval_millis: 1000,
            requests: 10,
            errors: 1,
            rate_limited: 2,
            refused: 0,
            latency_p95_millis: Some(120.0),
            latency_buckets: Vec::new(),
            breaker: BreakerState::Closed,
            lifecycle: Vec::new(),
            contract_violations: Vec::new(),
            credential_keys: None,
            credential_refresh_failures: 0,
            credential_check: None,
            adaptive_percent: None,
        }];
    }
    let key = ("payments".to_string(), "stripe".to_string());
    until("both sidecars up to date with traffic", WAIT, || {
        let o = op.hub.observe(&key, &rev);
        o.sidecars.up_to_date == 2 && o.traffic.is_some()
    })
    .await;
    let o = op.hub.observe(&key, &rev);
    assert_eq!(o.sidecars.desired, 2);
    let t = o.traffic.unwrap();
    // 1 failure among the 8 calls that reached the partner (2 were rate limited).
    assert_eq!(t.error_rate_percent, 12.5);
    assert_eq!(t.latency_p95.as_deref(), Some("120ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_travels_with_its_integration() {
    let (dir, certs, api) = fixture();
    let t1 = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let catalog = CatalogHandle::new();
    let mut spec = stripe(false);
    spec["upstream"]["clientCertificate"] = json!({"secretName": "stripe-mtls"});
    let tls = Credential {
        value: SecretValue::new("-----BEGIN PRIVATE KEY-----\nk3y\n-----END PRIVATE KEY-----\n"),
        secret_version: "9".into(),
        secret_name: "stripe-mtls".into(),
        allowed_hosts: None,
        certificate: Some("-----BEGIN CERTIFICATE-----\nc3rt\n-----END CERTIFICATE-----\n".into()),
    };
    catalog.upsert(
        entry("payments", "stripe", 1, spec, Some("sk_live_1")).with_client_certificate(Some(tls)),
    );
    let addr = free_addr();
    let _op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());
    let mut a = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &t1);
    let snap = a.next().await;
    let got = snap.integrations[0]
        .client_certificate
        .as_ref()
        .expect("the client certificate");
    assert!(got.certificate.contains("c3rt"));
    assert!(got.key.expose().contains("k3y"));
    assert!(!snap.integrations[0].client_certificate_held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_namespaces_unmatched_pods_and_bad_tokens_get_nothing() {
    let (dir, certs, api) = fixture();
    let logistics = api.add_pod("logistics", "router-1", &[("app", "checkout")]);
    let other_app = api.add_pod("payments", "ledger-1", &[("app", "ledger")]);
    let forged = api.add_token("forged", TokenKind::Rejected);
    let unbound = api.add_token(
        "unbound",
        TokenKind::Unbound {
            namespace: "payments".into(),
        },
    );
    let catalog = stripe_catalog();
    let addr = free_addr();
    let _op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());

    // Authenticated, but nothing of theirs: an empty snapshot, never the payments credential.
    let mut l = Sidecar::start(
        addr,
        &certs,
        dir.path(),
        "logistics",
        "router-1",
        &logistics,
    );
    let mut o = Sidecar::start(addr, &certs, dir.path(), "payments", "ledger-1", &other_app);
    for s in [&mut l, &mut o] {
        let snap = s.next().await;
        assert!(snap.integrations.is_empty(), "{snap:?}");
    }

    // Refused outright: nothing is applied, the state says why.
    let mut forged = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &forged);
    let st = forged
        .state_matches(|s| matches!(s, ConnectionState::Disconnected { .. }))
        .await;
    assert!(format!("{st:?}").contains("401"), "{st:?}");
    let mut unbound = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &unbound);
    let st = unbound
        .state_matches(|s| matches!(s, ConnectionState::Disconnected { .. }))
        .await;
    assert!(format!("{st:?}").contains("not bound to a pod"), "{st:?}");
    // A pod claiming another pod's name with its own valid token.
    let mut liar = Sidecar::start(
        addr,
        &certs,
        dir.path(),
        "payments",
        "checkout-1",
        &other_app,
    );
    let st = liar
        .state_matches(|s| matches!(s, ConnectionState::Disconnected { .. }))
        .await;
    assert!(format!("{st:?}").contains("403"), "{st:?}");

    // Changes in payments reach none of them.
    catalog.upsert(stripe_entry(2, true, "sk_live_2"));
    for s in [&mut l, &mut o, &mut forged, &mut unbound, &mut liar] {
        s.quiet(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_quota_is_divided_among_current_subscribers() {
    let (dir, certs, api) = fixture();
    let t1 = api.add_pod("shop", "web-1", &[]);
    let t2 = api.add_pod("shop", "web-2", &[]);
    let catalog = CatalogHandle::new();
    catalog.upsert(entry("shop", "partner", 1, global_quota(), None));
    let addr = free_addr();
    let _op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());

    let mut a = Sidecar::start(addr, &certs, dir.path(), "shop", "web-1", &t1);
    let share = a.next().await.integrations[0].quota_share.clone().unwrap();
    assert_eq!((share.subscribers, share.fraction), (1, 1.0));

    // web-2 joins: web-1 drops to half at once; web-2 starts with the smallest share and gets
    // its half once web-1 acknowledged the drop (never both above half at once).
    let mut b = Sidecar::start(addr, &certs, dir.path(), "shop", "web-2", &t2);
    let share_b = b.next().await.integrations[0].quota_share.clone().unwrap();
    assert_eq!(share_b.subscribers, 2);
    let snap = a.next().await;
    let share_a = snap.integrations[0].quota_share.clone().unwrap();
    assert_eq!((share_a.subscribers, share_a.fraction), (2, 0.5));
    assert_eq!(share_a.scale(10), 5);
    assert_eq!(snap.revision, 2);
    if share_b.fraction < 0.5 {
        let share_b = b.next().await.integrations[0].quota_share.clone().unwrap();
        assert_eq!((share_b.subscribers, share_b.fraction), (2, 0.5));
    }

    // web-2 goes away: web-1 counts alone at once, and gets the whole band back once web-2's
    // lease (three heartbeats and a second) has run out.
    drop(b);
    let gone = tokio::time::Instant::now();
    let snap = a.next().await;
    let share = snap.integrations[0].quota_share.clone().unwrap();
    assert_eq!((share.subscribers, share.fraction), (1, 0.5));
    assert_eq!(snap.revision, 3);
    let snap = a.next().await;
    let share = snap.integrations[0].quota_share.clone().unwrap();
    assert_eq!((share.subscribers, share.fraction), (1, 1.0));
    let lease = tollgate_operator::distribution::shares::lease(settings().heartbeat);
    assert!(
        gone.elapsed() >= lease,
        "reclaimed after {:?}",
        gone.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_snapshot_outlives_the_operator_and_resyncs() {
    let (dir, certs, api) = fixture();
    let t1 = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let catalog = stripe_catalog();
    let addr = free_addr();
    let op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());

    let mut s = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &t1);
    let first = s.next().await;
    assert_eq!(first.revision, 1);
    let state_file = dir.path().join("payments-checkout-1.snapshot.json");
    until("the snapshot persisted", WAIT, || state_file.exists()).await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // The operator stops; the sidecar notices and keeps what it has.
    op.stop();
    s.state_matches(|st| matches!(st, ConnectionState::Disconnected { .. }))
        .await;

    // The sidecar restarts while the operator is down: it enforces the persisted snapshot.
    drop(s);
    let mut s = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &t1);
    let restored = s.next().await;
    assert_eq!(restored, first);
    assert_eq!(
        restored.integrations[0]
            .credential
            .as_ref()
            .map(|c| c.expose()),
        Some("sk_live_1")
    );
    s.state_matches(|st| matches!(st, ConnectionState::Disconnected { .. }))
        .await;

    // The operator returns with the same catalog: the sidecar resumes, nothing to apply.
    let op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());
    s.state_matches(|st| *st == ConnectionState::Connected { revision: 1 })
        .await;
    s.quiet(Duration::from_millis(300)).await;

    // It changed meanwhile: the next revision follows the one the sidecar held.
    catalog.upsert(stripe_entry(2, true, "sk_live_2"));
    let next = s.next().await;
    assert_eq!(next.revision, 2);
    assert_eq!(
        next.integrations[0].credential.as_ref().map(|c| c.expose()),
        Some("sk_live_2")
    );
    op.stop();

    // And a restart of the operator with a change already made resyncs on connect.
    catalog.upsert(stripe_entry(3, false, "sk_live_2"));
    let _op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());
    let resynced = s.next().await;
    assert_eq!(resynced.revision, 3);
    assert!(
        !resynced.integrations[0]
            .spec
            .kill_switch
            .as_ref()
            .unwrap()
            .enabled
    );
}

/// A stream lives only as long as the pod it serves: once the pod is deleted, the operator
/// ends the stream at its next re-check, and a later credential rotation does not reach the
/// sidecar (its reconnects are refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_pod_is_deleted() {
    let (dir, certs, api) = fixture();
    let t1 = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let catalog = stripe_catalog();
    let addr = free_addr();
    let limits = ServerLimits {
        stream_recheck: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let op = OperatorProcess::start_with(addr, &certs, &api, catalog.clone(), settings(), limits);
    let mut s = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &t1);
    assert_eq!(s.next().await.revision, 1);

    api.remove_pod("payments", "checkout-1");
    ended_and_refused(&op, &catalog, &mut s, "403", "pod_gone").await;
}

/// A stream ends when its token expires (`exp`), with no re-check due: the sidecar must come
/// back with a fresh token, and an expired one gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    let (dir, certs, api) = fixture();
    let token = api.add_pod_token_expiring(
        "payments",
        "checkout-1",
        &[("app", "checkout")],
        Duration::from_secs(2),
    );
    let catalog = stripe_catalog();
    let addr = free_addr();
    let op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());
    let mut s = Sidecar::start(addr, &certs, dir.path(), "payments", "checkout-1", &token);
    assert_eq!(s.next().await.revision, 1);
    assert_eq!(op.hub.session_count(), 1);

    ended_and_refused(&op, &catalog, &mut s, "401", "token_expired").await;
}

/// One pod's token opens at most `max_streams_per_pod` streams; more are refused with 429
/// and counted, and the streams already open keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_pod_are_limited() {
    let (_dir, certs, api) = fixture();
    let t1 = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let catalog = stripe_catalog();
    let addr = free_addr();
    let limits = ServerLimits {
        max_streams_per_pod: 2,
        ..ServerLimits::default()
    };
    let op = OperatorProcess::start_with(addr, &certs, &api, catalog.clone(), settings(), limits);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut first = Sidecar::start(addr, &certs, dirs[0].path(), "payments", "checkout-1", &t1);
    let mut second = Sidecar::start(addr, &certs, dirs[1].path(), "payments", "checkout-1", &t1);
    assert_eq!(first.next().await.revision, 1);
    assert_eq!(second.next().await.revision, 1);
    let mut third = Sidecar::start(addr, &certs, dirs[2].path(), "payments", "checkout-1", &t1);
    let st = third
        .state_matches(|st| matches!(st, ConnectionState::Disconnected { .. }))
        .await;
    assert!(format!("{st:?}").contains("429"), "{st:?}");
    assert_eq!(op.hub.session_count(), 2);
    assert!(
        metric(
            &op.metrics.encode(),
            "tollgate_operator_auth_rejections_total",
            &[("reason", "stream_limit")]
        ) >= 1.0
    );
    catalog.upsert(stripe_entry(2, true, "sk_live_1"));
    assert_eq!(first.next().await.revision, 2);
    assert_eq!(second.next().await.revision, 2);
}

/// Junk does not cost the API server: a bearer that is not a JWT is refused without a
/// TokenReview, and a refused token is remembered, so retrying it costs nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_repeated_bad_tokens_cost_no_token_review_per_retry() {
    let (_dir, certs, api) = fixture();
    let forged = api.add_token("forged", TokenKind::Rejected);
    let catalog = CatalogHandle::new();
    let addr = free_addr();
    let op = OperatorProcess::start(addr, &certs, &api, catalog.clone(), settings());
    let mut junk = Vec::new();
    for i in 0..10 {
        let d = tempfile::tempdir().unwrap();
        let a = Sidecar::start(
            addr,
            &certs,
            d.path(),
            "payments",
            "p",
            &format!("junk-{i}"),
        );
        let b = Sidecar::start(addr, &certs, d.path(), "payments", "q", &forged);
        junk.push((d, a, b));
    }
    // Every one of them is refused, and keeps retrying.
    until("a hundred refusals", WAIT, || {
        metric(
            &op.metrics.encode(),
            "tollgate_operator_auth_rejections_total",
            &[("reason", "rejected")],
        ) + metric(
            &op.metrics.encode(),
            "tollgate_operator_auth_rejections_total",
            &[("reason", "malformed")],
        ) >= 100.0
    })
    .await;
    // At most one per forged sidecar (their first attempts race the cache), not one per try.
    assert!(api.reviews() <= 10, "{} TokenReviews", api.reviews());
    assert!(
        metric(
            &op.metrics.encode(),
            "tollgate_operator_token_review_cache_hits_total",
            &[],
        ) >= 10.0
    );
}

/// Acks and reports of an unknown session are refused from the headers, before any body
/// is read: a client that announces a body and never sends it does not hold the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_is_refused_before_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, certs, api) = fixture();
    let addr = free_addr();
    let _op = OperatorProcess::start(addr, &certs, &api, CatalogHandle::new(), settings());
    let mut tls = support::tls_connect(addr, &certs).await;
    tls.write_all(
        b"POST /v1/ack HTTP/1.1\r\nhost: localhost\r\nx-tollgate-session: nope\r\ncontent-length: 100000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .expect("an answer before the body")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 409"), "{head}");
}
