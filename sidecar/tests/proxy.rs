//! The outbound listener with real sockets: forward proxy, Host routing, pass-through,
//! CONNECT, TLS origination, and the hardening limits.

mod support;

use std::time::Duration;

use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn passthrough_spec(url: &str) -> String {
    manifest("partner", &format!("upstream: {{url: '{url}'}}"))
}

#[tokio::test]
async fn forward_proxy_passes_the_partner_response_through_unchanged() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Full {
        status: 201,
        headers: vec![
            ("x-partner".into(), "yes".into()),
            ("content-type".into(), "application/json".into()),
        ],
        body: r#"{"id":"ch_1"}"#.into(),
    });
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let resp = sidecar
        .send(
            Method::POST,
            &format!("{}/v1/charges?expand=x", partner.url()),
            &[("content-type", "application/json"), ("x-app", "1")],
            r#"{"amount":5}"#,
        )
        .await;
    assert_eq!(resp.status, 201);
    assert_eq!(resp.headers["x-partner"], "yes");
    assert_eq!(resp.body, r#"{"id":"ch_1"}"#);
    assert!(resp.reason().is_none());
    let seen = partner.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].path, "/v1/charges?expand=x");
    assert_eq!(seen[0].headers["x-app"], "1");
    assert_eq!(seen[0].headers["host"], partner.addr.to_string().as_str());
    assert_eq!(&seen[0].body[..], br#"{"amount":5}"#);
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_requests_total",
            &[
                ("integration", "test/partner"),
                ("outcome", "success"),
                ("code", "201")
            ]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn origin_form_is_routed_by_host() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let host = partner.addr.to_string();
    let resp = request(
        sidecar.listen,
        Method::GET,
        "/v1/ping",
        &[("host", &host)],
        "",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(partner.seen()[0].path, "/v1/ping");
}

#[tokio::test]
async fn upstream_base_path_is_prepended() {
    let partner = Partner::start().await;
    let spec = manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}/api/v2', hosts: [partner.test]}}",
            partner.url()
        ),
    );
    let sidecar = Sidecar::start(&spec).await;
    let resp = sidecar.get("http://partner.test/things/1").await;
    assert_eq!(resp.status, 200);
    assert_eq!(partner.seen()[0].path, "/api/v2/things/1");
    assert_eq!(
        partner.seen()[0].headers["host"],
        partner.addr.to_string().as_str()
    );
}

#[tokio::test]
async fn unknown_hosts_pass_through_untouched_or_are_denied() {
    let partner = Partner::start().await;
    let other = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let resp = sidecar.get(&format!("{}/elsewhere", other.url())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(other.count(), 1);
    assert_eq!(partner.count(), 0);

    let denying = Sidecar::start_with(
        &passthrough_spec(&partner.url()),
        Options {
            args: vec!["--unknown-hosts".into(), "deny".into()],
            ..Options::default()
        },
    )
    .await;
    let resp = denying.get(&format!("{}/elsewhere", other.url())).await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.reason(), Some("unknown-host"));
    assert_eq!(other.count(), 1, "a denied request is never sent");
}

#[tokio::test]
async fn https_partner_gets_tls_from_the_sidecar() {
    let ca = TestCa::new();
    let partner = Partner::start_tls(&ca).await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca.ca_pem).unwrap();
    let port = partner.addr.port();
    let spec = manifest(
        "secure",
        &format!("upstream: {{url: 'https://localhost:{port}'}}"),
    );
    let sidecar = Sidecar::start_with(
        &spec,
        Options {
            args: vec!["--ca-bundle".into(), ca_file.path().display().to_string()],
            ..Options::default()
        },
    )
    .await;
    // The app speaks plain HTTP to the sidecar; the sidecar originates TLS to the partner.
    let resp = sidecar
        .get(&format!("http://localhost:{port}/v1/secure"))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(partner.seen()[0].path, "/v1/secure");

    // Without the CA the partner's certificate is refused: nothing is sent.
    let untrusting = Sidecar::start(&spec).await;
    let resp = untrusting
        .get(&format!("http://localhost:{port}/v1/secure"))
        .await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.reason(), Some("upstream-unreachable"));
    assert_eq!(partner.count(), 1);
}

async fn connect(sidecar: &Sidecar, target: &str) -> (String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(sidecar.listen)
        .await
        .unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

#[tokio::test]
async fn connect_tunnels_bytes_and_obeys_the_kill_switch() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let (head, mut s) = connect(&sidecar, &partner.addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(
        format!(
            "GET /inside HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            partner.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(partner.seen()[0].path, "/inside");

    sidecar
        .write_kill_switch(
            &manifest(
                "partner",
                &format!(
                    "upstream: {{url: '{}'}}\nkillSwitch: {{enabled: true, reason: INC-7}}",
                    partner.url()
                ),
            ),
            true,
        )
        .await;
    let (head, _s) = connect(&sidecar, &partner.addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-tollgate-reason: kill-switch"),
        "{head}"
    );
    assert_eq!(partner.count(), 1, "no new connection reached the partner");
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_tunnels_total", &[("outcome", "kill-switch")]),
        1.0,
        "{m}"
    );
}

/// A head over `--max-header-bytes` gets the contract's answer (400 `bad-request`, header and
/// JSON body), whether it ends or not, and the connection closes; nothing reaches the partner,
/// and a head within the limit still passes.
#[tokio::test]
async fn oversized_heads_get_400_bad_request_and_reach_nobody() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &passthrough_spec(&partner.url()),
        Options {
            args: vec!["--max-header-bytes".into(), "8192".into()],
            ..Options::default()
        },
    )
    .await;
    // 20 KB: past what hyper itself would buffer; 9 KB: past the limit, within hyper's buffer.
    for size in [20_000, 9_000] {
        let big = "a".repeat(size);
        let out = raw(
            sidecar.listen,
            format!(
                "GET /x HTTP/1.1\r\nHost: {}\r\nX-Big: {big}\r\n\r\n",
                partner.addr
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        assert!(head.starts_with("HTTP/1.1 400 "), "{size}: {out}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("x-tollgate-reason: bad-request"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["reason"], "bad-request", "{body}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("--max-header-bytes"), "{message}");
    }
    assert_eq!(partner.count(), 0);
    let fits = "a".repeat(7_000);
    let out = raw(
        sidecar.listen,
        format!(
            "GET /x HTTP/1.1\r\nHost: {}\r\nX-Big: {fits}\r\nConnection: close\r\n\r\n",
            partner.addr
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(partner.count(), 1);
}

#[tokio::test]
async fn smuggling_shapes_are_refused_and_never_forwarded() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let host = partner.addr;
    let both = format!(
        "POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    let out = raw(sidecar.listen, both.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-tollgate-reason: bad-request"), "{out}");
    let conflicting = format!(
        "POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
    );
    let out = raw(
        sidecar.listen,
        conflicting.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(partner.count(), 0, "{:?}", partner.seen());
}

#[tokio::test]
async fn bodies_over_the_limit_get_400() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &passthrough_spec(&partner.url()),
        Options {
            args: vec!["--max-body-bytes".into(), "1000".into()],
            ..Options::default()
        },
    )
    .await;
    let resp = sidecar
        .send(
            Method::POST,
            &format!("{}/upload", partner.url()),
            &[],
            &"x".repeat(5000),
        )
        .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.reason(), Some("bad-request"));
    assert_eq!(resp.json()["error"]["integration"], "test/partner");
    assert_eq!(partner.count(), 0);
    let resp = sidecar
        .send(
            Method::POST,
            &format!("{}/upload", partner.url()),
            &[],
            &"x".repeat(900),
        )
        .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_disconnected() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &passthrough_spec(&partner.url()),
        Options {
            args: vec!["--header-read-timeout".into(), "200ms".into()],
            ..Options::default()
        },
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(sidecar.listen)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the sidecar closed the slow connection");
    assert_eq!(partner.count(), 0);
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &passthrough_spec(&partner.url()),
        Options {
            args: vec!["--max-connections".into(), "2".into()],
            ..Options::default()
        },
    )
    .await;
    let _a = tokio::net::TcpStream::connect(sidecar.listen)
        .await
        .unwrap();
    let _b = tokio::net::TcpStream::connect(sidecar.listen)
        .await
        .unwrap();
    sidecar
        .wait_metrics("two open connections", |m| {
            metric(m, "tollgate_open_connections", &[]) == 2.0
        })
        .await;
    let mut c = tokio::net::TcpStream::connect(sidecar.listen)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed at once");
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_rejected_connections_total", &[]),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn runtime_tasks_follow_the_open_connections_and_come_back_down() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let before = metric(&sidecar.metrics().await, "tollgate_runtime_tasks", &[]);
    assert!(before >= 1.0, "the gauge is exported");
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(
            tokio::net::TcpStream::connect(sidecar.listen)
                .await
                .unwrap(),
        );
    }
    sidecar
        .wait_metrics("a task per open connection", |m| {
            metric(m, "tollgate_open_connections", &[]) == 20.0
                && metric(m, "tollgate_runtime_tasks", &[]) >= before + 20.0
        })
        .await;
    drop(conns);
    sidecar
        .wait_metrics("the connection tasks ended", |m| {
            metric(m, "tollgate_open_connections", &[]) == 0.0
                && metric(m, "tollgate_runtime_tasks", &[]) <= before
        })
        .await;
}

#[tokio::test]
async fn sigterm_drains_the_request_in_flight() {
    let partner = Partner::start().await;
    partner.script(|_, _| {
        Reply::Delay(
            Duration::from_millis(700),
            Box::new(Reply::ok("late but whole")),
        )
    });
    let mut sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let url = format!("{}/slow", partner.url());
    let listen = sidecar.listen;
    let in_flight = tokio::spawn(async move { request(listen, Method::GET, &url, &[], "").await });
    while partner.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "late but whole");
    let exit = sidecar
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the sidecar exits after draining");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    assert_eq!(sidecar.admin_get("/healthz").await.status, 200);
    let ready = sidecar.admin_get("/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(ready.body.contains("revision"));
    let c = sidecar.config().await;
    assert_eq!(c["source"]["kind"], "file");
    assert_eq!(c["integrations"][0]["id"]["name"], "partner");
    let m = sidecar.metrics().await;
    assert!(m.contains("tollgate_config_revision_info{"), "{m}");
    assert_eq!(sidecar.admin_get("/nope").await.status, 404);
}

// === framing parity and self-loops ===

/// Heads with bare-LF line endings (which the parser accepts) meet the same smuggling guard as
/// CRLF heads: Content-Length with Transfer-Encoding is refused and nothing is forwarded.
#[tokio::test]
async fn bare_lf_heads_meet_the_smuggling_guard_too() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let host = partner.addr;
    let smuggle = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n";
    for (name, head) in [
        (
            "bare LF",
            format!(
                "POST /x HTTP/1.1\nHost: {host}\nContent-Length: 4\nTransfer-Encoding: chunked\n\n"
            ),
        ),
        (
            "mixed",
            format!(
                "POST /x HTTP/1.1\r\nHost: {host}\nTransfer-Encoding: chunked\r\nContent-Length: 4\n\r\n"
            ),
        ),
    ] {
        let out = raw(
            sidecar.listen,
            format!("{head}{}", smuggle.replace("{host}", &host.to_string())).as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 400"), "{name}: {out}");
        assert!(
            out.contains("x-tollgate-reason: bad-request"),
            "{name}: {out}"
        );
        assert!(out.contains("smuggling"), "{name}: {out}");
    }
    assert_eq!(partner.count(), 0, "{:?}", partner.seen());

    // A bare-LF request first, then a CRLF one with both headers on the same connection: the
    // guard must still know where the first ended.
    let out = raw(
        sidecar.listen,
        format!(
            "GET /first HTTP/1.1\nHost: {host}\n\nPOST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            smuggle.replace("{host}", &host.to_string())
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("HTTP/1.1 400"), "{out}");
    let paths: Vec<String> = partner.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/first"], "only the first request is forwarded");
    partner.clear();

    // A plain bare-LF request is still served.
    let out = raw(
        sidecar.listen,
        format!("GET /plain HTTP/1.1\nHost: {host}\nConnection: close\n\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(partner.count(), 1);
}

/// Bounded: a loop would otherwise run until the sidecar's connection slots are gone.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 10s"))
}

/// A request to the sidecar's own listener through any address of the machine is refused at
/// once with 400 `bad-request` naming the loop, and the listener keeps serving.
#[tokio::test]
async fn requests_to_the_sidecar_itself_are_refused_as_a_loop() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&passthrough_spec(&partner.url())).await;
    let port = sidecar.listen.port();
    // The machine's own addresses (a pod's IP): the listener is not bound there, but a listener
    // on 0.0.0.0 would be, and no partner lives at the sidecar's own port on this machine.
    let own = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "scope", "global"])
        .output()
        .expect("iproute2's ip lists this machine's addresses");
    let own: Vec<String> = String::from_utf8_lossy(&own.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        })
        .collect();
    assert!(!own.is_empty(), "this machine has a global address");
    for host in own.into_iter().chain([
        format!("0.0.0.0:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::]:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("localhost:{port}"),
        format!("localhost.:{port}"),
    ]) {
        let resp = within(&host, sidecar.get(&format!("http://{host}/v1/x"))).await;
        assert_eq!(resp.status, 400, "{host}: {}", resp.body);
        assert_eq!(resp.reason(), Some("bad-request"), "{host}");
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains("loop"), "{host}: {message}");

        // Routed by Host, as transparent interception delivers it.
        let resp = within(
            &host,
            request(sidecar.listen, Method::GET, "/v1/x", &[("host", &host)], ""),
        )
        .await;
        assert_eq!(resp.status, 400, "Host {host}: {}", resp.body);

        let (head, _) = within(&host, connect(&sidecar, &host)).await;
        assert!(head.starts_with("HTTP/1.1 400"), "CONNECT {host}: {head}");
    }
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_rejected_connections_total", &[]),
        0.0,
        "{m}"
    );
    // The listener still serves real traffic.
    assert_eq!(sidecar.status_of(&partner, "/ok").await, 200);
}
