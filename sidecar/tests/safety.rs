//! Config safety: nothing from outside (a partner's header, a spec, a snapshot) crashes the
//! sidecar or stops later revisions; one bad integration is refused alone; policy matches the
//! normalised path and host; credentials never go over cleartext to a remote partner.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tollgate_crds::distribution::{
    ClientCertificateValue, DistributedIntegration, Hello, PROTOCOL_VERSION, SecretValue, Snapshot,
    StreamMessage,
};
use tollgate_crds::v1alpha1::PartnerIntegrationSpec;
use tollgate_testkit::http::get;
use tollgate_testkit::sidecar::{self, Logs};
use tollgate_testkit::wait::eventually_async;

fn spec(partner: &Partner, rest: &str) -> String {
    manifest(
        "partner",
        &format!("upstream: {{url: '{}'}}\n{rest}", partner.url()),
    )
}

// === defect: panics reachable from input ===

#[tokio::test]
async fn a_huge_retry_after_from_the_partner_is_clamped_and_the_app_gets_the_answer() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "retries: {maxAttempts: 3}\ntimeouts: {request: 1s, total: 2s}",
    ))
    .await;
    partner.queue([Reply::Full {
        status: 503,
        headers: vec![("retry-after".into(), "99999999999999999999".into())],
        body: "busy".into(),
    }]);
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 503, "the partner's own answer: {resp:?}");
    assert_eq!(resp.reason(), None, "passed through, not the sidecar's");
    assert_eq!(resp.body, "busy");
    assert_eq!(
        partner.count(),
        1,
        "a wait past the deadline is not attempted"
    );
    // Still serving.
    assert_eq!(sidecar.status_of(&partner, "/v1/y").await, 200);
}

#[tokio::test]
async fn the_same_host_twice_in_one_spec_is_refused_by_field_and_later_edits_still_apply() {
    let partner = Partner::start().await;
    let good = spec(&partner, "");
    let sidecar = Sidecar::start(&good).await;
    let bad = spec(&partner, "").replace(
        "upstream: {",
        "upstream: {hosts: [api.x, 'api.x:8443', api.y], ",
    );
    sidecar.write_config(&bad);
    sidecar
        .wait_metrics("the refused edit counted", |m| {
            metric(m, "tollgate_config_errors_total", &[]) >= 1.0
        })
        .await;
    assert!(
        sidecar.log_text().contains("spec.upstream.hosts[1]"),
        "{}",
        sidecar.log_text()
    );
    // The sidecar still applies what comes next: a kill switch is never lost.
    sidecar
        .write_kill_switch(
            &spec(&partner, "killSwitch: {enabled: true, reason: stop}"),
            true,
        )
        .await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), Some("kill-switch"));
}

#[tokio::test]
async fn very_long_spec_durations_are_refused_by_field() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(&partner, "")).await;
    sidecar.write_config(&spec(
        &partner,
        "timeouts: {request: 1s, total: 99999999999h}",
    ));
    sidecar
        .wait_metrics("the refused edit counted", |m| {
            metric(m, "tollgate_config_errors_total", &[]) >= 1.0
        })
        .await;
    assert!(
        sidecar.log_text().contains("spec.timeouts.total"),
        "{}",
        sidecar.log_text()
    );
    assert_eq!(sidecar.status_of(&partner, "/v1/x").await, 200);
}

#[tokio::test]
async fn a_snapshot_digest_of_any_characters_is_applied() {
    let partner = Partner::start().await;
    let op = FakeOperator::start().await;
    let sidecar = ClusterSidecar::start(&op).await;
    op.push(snapshot(
        1,
        "aaaaaaaaaaa€€€",
        vec![integration(
            "a",
            &format!(
                "upstream: {{url: '{}'}}\nkillSwitch: {{enabled: true}}",
                partner.url()
            ),
        )],
    ));
    op.wait_ack(1, &sidecar).await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.reason(), Some("kill-switch"));
}

// === defect: one bad integration freezes the pod ===

#[tokio::test]
async fn a_bad_integration_in_a_snapshot_is_refused_alone_and_the_others_apply() {
    let a = Partner::start().await;
    let b = Partner::start().await;
    let c = Partner::start().await;
    let op = FakeOperator::start().await;
    let sidecar = ClusterSidecar::start(&op).await;
    let a_spec = format!("upstream: {{url: '{}', hosts: [shared.example]}}", a.url());
    op.push(snapshot(
        1,
        "d1",
        vec![
            integration("a", &a_spec),
            integration("c", &format!("upstream: {{url: '{}'}}", c.url())),
        ],
    ));
    op.wait_ack(1, &sidecar).await;
    assert_eq!(sidecar.get("http://shared.example/v1/x").await.status, 200);
    assert_eq!(a.count(), 1);

    // "b" claims a's host, "d" does not compile; c's kill switch must still arrive.
    op.push(snapshot(
        2,
        "d2",
        vec![
            integration("a", &a_spec),
            integration(
                "b",
                &format!("upstream: {{url: '{}', hosts: [SHARED.example.]}}", b.url()),
            ),
            integration(
                "c",
                &format!(
                    "upstream: {{url: '{}'}}\nkillSwitch: {{enabled: true}}",
                    c.url()
                ),
            ),
            integration(
                "d",
                "upstream: {url: 'http://127.0.0.1:1'}\nretries: {backoff: {base: -5s}}",
            ),
        ],
    ));
    op.wait_ack(2, &sidecar).await;
    let resp = sidecar.get(&format!("{}/v1/x", c.url())).await;
    assert_eq!(resp.reason(), Some("kill-switch"), "{resp:?}");
    assert_eq!(c.count(), 0);
    assert_eq!(sidecar.get("http://shared.example/v1/y").await.status, 200);
    assert_eq!(a.count(), 2, "the integration in force keeps its host");
    assert_eq!(b.count(), 0);

    let config = sidecar.config().await;
    let refused = config["refused"].as_array().expect("refused in /config");
    let named = |n: &str| {
        refused
            .iter()
            .find(|r| r["integration"] == n)
            .unwrap_or_else(|| panic!("{n} refused: {config}"))["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(named("test/b").contains("shared.example"));
    assert!(named("test/b").contains("test/a"));
    assert!(named("test/d").contains("spec.retries.backoff.base"));
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_config_refused", &[("integration", "test/b")]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "tollgate_config_refused", &[("integration", "test/a")]),
        0.0
    );
    assert_eq!(metric(&m, "tollgate_config_errors_total", &[]), 1.0);
    let log = sidecar.log_text();
    assert!(log.contains("test/b") && log.contains("refused"), "{log}");
}

#[tokio::test]
async fn in_a_file_the_first_integration_keeps_a_contested_host_and_the_rest_apply() {
    let a = Partner::start().await;
    let c = Partner::start().await;
    let sidecar =
        Sidecar::start(&manifest("c", &format!("upstream: {{url: '{}'}}", c.url()))).await;
    sidecar.write_config(&format!(
        "{}---\n{}---\n{}",
        manifest(
            "a",
            &format!("upstream: {{url: '{}', hosts: [shared.example]}}", a.url())
        ),
        manifest(
            "b",
            "upstream: {url: 'http://127.0.0.1:1', hosts: [shared.example]}"
        ),
        manifest(
            "c",
            &format!(
                "upstream: {{url: '{}'}}\nkillSwitch: {{enabled: true}}",
                c.url()
            )
        ),
    ));
    sidecar
        .wait_config("b refused", |c| {
            c["refused"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["integration"] == "test/b"))
        })
        .await;
    assert_eq!(
        sidecar.get(&format!("{}/v1/x", c.url())).await.reason(),
        Some("kill-switch")
    );
    assert_eq!(sidecar.get("http://shared.example/v1/x").await.status, 200);
    assert_eq!(a.count(), 1);
    let config = sidecar.config().await;
    let error = config["refused"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("shared.example is already claimed by test/a"),
        "{error}"
    );
    let m = sidecar.metrics().await;
    assert_eq!(metric(&m, "tollgate_config_errors_total", &[]), 1.0);
    assert_eq!(
        metric(&m, "tollgate_config_refused", &[("integration", "test/b")]),
        1.0
    );
}

// === defect: policy by spelling ===

#[tokio::test]
async fn denied_prefixes_and_routes_match_the_normalised_path_which_is_what_is_forwarded() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "versioning: {deniedPathPrefixes: [/v0]}\nroutes:\n- name: tracking\n  match: {pathPrefix: /v1/tracking}\n  killSwitch: {enabled: true}",
    ))
    .await;
    for path in [
        "//v0/charges",
        "/v1/../v0/charges",
        "/%76%30/charges",
        "/v1/%2E%2E/v0",
        "/./v0",
    ] {
        let resp = sidecar.get(&format!("{}{path}", partner.url())).await;
        assert_eq!(resp.status, 410, "{path}: {resp:?}");
        assert_eq!(resp.reason(), Some("deprecated-version"));
    }
    for path in ["/v1//tracking/9", "/v1/x/../tracking", "/v1/%74racking"] {
        let resp = sidecar.get(&format!("{}{path}", partner.url())).await;
        assert_eq!(resp.reason(), Some("kill-switch"), "{path}: {resp:?}");
    }
    let resp = sidecar.get(&format!("{}/v1/a%zz", partner.url())).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(resp.reason(), Some("bad-request"));
    assert_eq!(
        partner.count(),
        0,
        "nothing denied or malformed reached the partner"
    );

    let resp = sidecar
        .get(&format!("{}//v1//a/./b/../c%7e%2f?q=%2E%2E", partner.url()))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        partner.seen()[0].path,
        "/v1/a/c~%2F?q=%2E%2E",
        "the partner gets the path that was matched; the query is untouched"
    );
}

#[tokio::test]
async fn a_host_in_other_case_or_with_a_trailing_dot_finds_its_integration() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}', hosts: [api.partner.example]}}\nversioning: {{pinHeaders: {{X-Pinned: 'yes'}}}}",
            partner.url()
        ),
    ))
    .await;
    for host in [
        "API.Partner.Example",
        "api.partner.example.",
        "Api.Partner.EXAMPLE.",
    ] {
        // Origin-form, as transparent interception delivers it.
        let resp = sidecar
            .send(Method::GET, "/v1/x", &[("host", host)], "")
            .await;
        assert_eq!(resp.status, 200, "{host}: {resp:?}");
    }
    let seen = partner.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.headers["x-pinned"] == "yes"));
}

// === defect: credentials over cleartext ===

#[tokio::test]
async fn credentials_to_a_remote_http_upstream_are_refused_unless_allowed() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(&partner, ""),
        Options {
            secrets: vec![("api".into(), "key".into(), "sk_live_1".into())],
            ..Options::default()
        },
    )
    .await;
    let remote = "upstream: {url: 'http://api.partner.example'}\ncredentials: {secretRef: {name: api, key: key}}";
    sidecar.write_config(&manifest("remote", remote));
    sidecar
        .wait_metrics("the refused edit counted", |m| {
            metric(m, "tollgate_config_errors_total", &[]) >= 1.0
        })
        .await;
    let log = sidecar.log_text();
    assert!(log.contains("spec.credentials"), "{log}");
    assert!(log.contains("allowInsecure"), "{log}");
    assert!(!log.contains("sk_live_1"));

    // Said explicitly, it is accepted.
    sidecar.write_config(&manifest(
        "remote",
        &remote.replace("key: key}", "key: key}, allowInsecure: true"),
    ));
    sidecar
        .wait_config("the explicit opt-in", |c| {
            c["integrations"][0]["id"]["name"] == "remote"
        })
        .await;
}

#[tokio::test]
async fn credentials_to_a_loopback_http_upstream_are_injected() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(
            &partner,
            "credentials: {secretRef: {name: api, key: key}, format: 'Bearer {value}'}",
        ),
        Options {
            secrets: vec![("api".into(), "key".into(), "sk_live_1".into())],
            ..Options::default()
        },
    )
    .await;
    assert_eq!(sidecar.status_of(&partner, "/v1/x").await, 200);
    assert_eq!(
        partner.seen()[0].headers["authorization"],
        "Bearer sk_live_1"
    );
}

// === mutual TLS from the operator's snapshot ===

#[tokio::test]
async fn a_client_certificate_from_the_operator_is_presented_and_kept_while_held() {
    let server = TestCa::new();
    let clients = TestCa::named("partner client CA");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let partner = Partner::start_on(listener, Some(server.mtls_server_config(&clients)));
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &server.ca_pem).unwrap();
    let op = FakeOperator::start().await;
    let sidecar =
        ClusterSidecar::start_with(&op, &["--ca-bundle", ca.path().to_str().unwrap()]).await;
    let leaf = clients.issue(&["tollgate-client"]);
    let mtls = |value: Option<&tollgate_testkit::ca::Leaf>, held: bool| {
        let mut i = integration(
            "mtls",
            &format!(
                "upstream: {{url: 'https://localhost:{port}', clientCertificate: {{secretName: partner-mtls}}}}\nretries: {{maxAttempts: 1}}"
            ),
        );
        i.client_certificate = value.map(|l| ClientCertificateValue {
            certificate: l.cert_pem.clone(),
            key: SecretValue::new(l.key_pem.clone()),
        });
        i.client_certificate_held = held;
        i
    };
    let url = format!("http://localhost:{port}/v1/x");

    op.push(snapshot(1, "d1", vec![mtls(Some(&leaf), false)]));
    op.wait_ack(1, &sidecar).await;
    assert_eq!(sidecar.get(&url).await.status, 200);
    let config = sidecar.config().await.to_string();
    assert!(config.contains(r#""loaded":true"#), "{config}");
    let key_line = leaf.key_pem.lines().nth(1).unwrap();
    assert!(!config.contains(key_line));

    // An operator that restarted while the Secret was unreadable holds it back: the sidecar
    // keeps presenting the certificate it has.
    op.push(snapshot(2, "d2", vec![mtls(None, true)]));
    op.wait_ack(2, &sidecar).await;
    assert_eq!(sidecar.get(&url).await.status, 200);

    // Without a certificate, the partner refuses the handshake.
    op.push(snapshot(3, "d3", vec![mtls(None, false)]));
    op.wait_ack(3, &sidecar).await;
    let refused = sidecar.get(&url).await;
    assert_eq!(refused.status, 502, "{refused:?}");
    assert_eq!(partner.count(), 2);
    assert!(!sidecar.log_text().contains(key_line));
}

// === a stand-in operator: the distribution protocol over HTTP/2 and TLS ===

fn integration(name: &str, spec_yaml: &str) -> DistributedIntegration {
    let spec: PartnerIntegrationSpec = serde_yaml::from_str(spec_yaml).unwrap();
    DistributedIntegration {
        namespace: "test".into(),
        name: name.into(),
        generation: 1,
        config_revision: format!("1-{name}"),
        spec,
        credential: None,
        quota_share: None,
        credential_held: false,
        client_certificate: None,
        client_certificate_held: false,
        more_credentials: Vec::new(),
        more_credentials_held: false,
    }
}

fn snapshot(revision: u64, digest: &str, integrations: Vec<DistributedIntegration>) -> Snapshot {
    Snapshot {
        protocol: PROTOCOL_VERSION,
        revision,
        digest: digest.into(),
        integrations,
    }
}

type Streams = Arc<Mutex<Vec<mpsc::UnboundedSender<Bytes>>>>;

struct FakeOperator {
    addr: SocketAddr,
    ca: TestCa,
    current: Arc<Mutex<Option<Snapshot>>>,
    streams: Streams,
    acks: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn line(m: &StreamMessage) -> Bytes {
    let mut v = serde_json::to_vec(m).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

impl FakeOperator {
    async fn start() -> FakeOperator {
        let ca = TestCa::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let current: Arc<Mutex<Option<Snapshot>>> = Arc::default();
        let streams: Streams = Arc::default();
        let acks: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (cur, st, ak) = (current.clone(), streams.clone(), acks.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (cur, st, ak, acceptor) =
                    (cur.clone(), st.clone(), ak.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (cur, st, ak) = (cur.clone(), st.clone(), ak.clone());
                        async move { Ok::<_, std::convert::Infallible>(serve(req, cur, st, ak).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeOperator {
            addr,
            ca,
            current,
            streams,
            acks,
            task,
        }
    }

    fn push(&self, s: Snapshot) {
        let l = line(&StreamMessage::Snapshot(s.clone()));
        *self.current.lock().unwrap() = Some(s);
        self.streams
            .lock()
            .unwrap()
            .retain(|tx| tx.send(l.clone()).is_ok());
    }

    async fn wait_ack(&self, revision: u64, sidecar: &ClusterSidecar) {
        let what = format!("revision {revision} acknowledged");
        eventually_async(&what, Duration::from_secs(10), async || {
            anyhow::ensure!(
                self.acks.lock().unwrap().contains(&revision),
                "log:\n{}",
                sidecar.log_text()
            );
            Ok(())
        })
        .await
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn serve(
    req: Request<Incoming>,
    current: Arc<Mutex<Option<Snapshot>>>,
    streams: Streams,
    acks: Arc<Mutex<Vec<u64>>>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == tollgate_crds::distribution::SUBSCRIBE_PATH {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(line(&StreamMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            session: "s1".into(),
            heartbeat_seconds: 30,
            report_interval_seconds: 30,
        })));
        if let Some(s) = current.lock().unwrap().clone() {
            let _ = tx.send(line(&StreamMessage::Snapshot(s)));
        }
        streams.lock().unwrap().push(tx);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
        });
        return Response::new(StreamBody::new(stream).boxed());
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    if path == tollgate_crds::distribution::ACK_PATH
        && let Ok(a) = serde_json::from_slice::<tollgate_crds::distribution::Ack>(&body)
    {
        acks.lock().unwrap().push(a.revision);
    }
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The sidecar binary in cluster mode, subscribed to a [`FakeOperator`].
struct ClusterSidecar {
    _child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    logs: Logs,
}

impl ClusterSidecar {
    async fn start(op: &FakeOperator) -> ClusterSidecar {
        Self::start_with(op, &[]).await
    }

    async fn start_with(op: &FakeOperator, args: &[&str]) -> ClusterSidecar {
        let dir = tempfile::tempdir().unwrap();
        let token: PathBuf = dir.path().join("token");
        let ca = dir.path().join("ca.crt");
        std::fs::write(&token, "t0ken").unwrap();
        std::fs::write(&ca, &op.ca.ca_pem).unwrap();
        let started = sidecar::start(
            Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
                .args([
                    "--operator",
                    &format!("https://127.0.0.1:{}", op.addr.port()),
                ])
                .arg("--token-file")
                .arg(&token)
                .arg("--operator-ca")
                .arg(&ca)
                .arg("--state-file")
                .arg(dir.path().join("snapshot.json"))
                .args(["--pod-name", "app-0", "--pod-namespace", "test"])
                .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .args(["--log-format", "json"])
                .args(args)
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true),
            Duration::from_secs(30),
        )
        .await;
        ClusterSidecar {
            _child: started.child,
            listen: started.listen,
            admin: started.admin,
            _dir: dir,
            logs: started.logs,
        }
    }

    fn log_text(&self) -> String {
        self.logs.text()
    }

    async fn get(&self, url: &str) -> Resp {
        request(self.listen, Method::GET, url, &[], "").await
    }

    async fn config(&self) -> serde_json::Value {
        serde_json::from_str(&get(self.admin, "/config").await.body).unwrap()
    }

    async fn metrics(&self) -> String {
        get(self.admin, "/metrics").await.body
    }
}
