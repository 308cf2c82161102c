//! The admin listener as an injected pod runs it: bound on every address of the machine, so
//! the kubelet and scrapers reach it on the pod IP, while `/config` answers loopback peers only.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::net::TcpSocket;
use tokio::process::{Child, Command};
use tollgate_testkit::free_addr;
use tollgate_testkit::http::send_over;
use tollgate_testkit::wait::eventually_async;

/// A non-loopback address of this machine: the source address of its default route.
fn machine_address() -> IpAddr {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and the source address.
    s.connect("198.51.100.1:9").unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback(), "this test needs a non-loopback address");
    ip
}

/// GET `path` from `to`, the connection coming from `from`: (status, body).
async fn get_from(from: IpAddr, to: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket.connect(to).await?;
    let req = http::Request::get(path)
        .header("host", to.to_string())
        .body(Full::new(Bytes::new()))?;
    let r = send_over(stream, req).await?;
    Ok((r.status, r.body))
}

/// Polls `path` from `from` until the listener answers, for at most 20 s.
async fn answer(from: IpAddr, to: SocketAddr, path: &str) -> (u16, String) {
    let what = format!("{path} from {from}");
    eventually_async(&what, Duration::from_secs(20), async || {
        get_from(from, to, path).await
    })
    .await
}

fn standalone(dir: &std::path::Path, admin: SocketAddr) -> Child {
    let config = dir.join("integrations.yaml");
    std::fs::write(&config, "").unwrap();
    Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--admin")
        .arg(admin.to_string())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn config_answers_loopback_peers_only_while_metrics_and_probes_answer_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_addr().port();
    let _sidecar = standalone(dir.path(), SocketAddr::from(([0, 0, 0, 0], port)));
    let outside = machine_address();
    let pod_ip = SocketAddr::new(outside, port);
    let loopback: IpAddr = [127, 0, 0, 1].into();

    let (status, body) = answer(outside, pod_ip, "/config").await;
    assert_eq!(status, 403, "/config from {outside}: {body}");
    assert!(body.contains("loopback"), "{body}");

    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = answer(outside, pod_ip, path).await;
        assert_eq!(status, 200, "{path} from {outside}: {body}");
    }
    let (_, metrics) = answer(outside, pod_ip, "/metrics").await;
    assert!(
        metrics.contains("tollgate_config_revision_info"),
        "{metrics}"
    );

    let (status, body) = answer(loopback, SocketAddr::new(loopback, port), "/config").await;
    assert_eq!(status, 200, "/config from loopback: {body}");
    assert!(body.contains("\"revision\""), "{body}");
}

/// A cluster-mode sidecar whose operator never answers: no revision ever arrives.
fn without_operator(dir: &std::path::Path, admin: SocketAddr, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--admin")
        .arg(admin.to_string())
        .args(["--operator", "https://127.0.0.1:1"])
        .args(["--pod-name", "app-0", "--pod-namespace", "payments"])
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--state-file")
        .arg(dir.join("snapshot.json"))
        .args(extra)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn without_a_revision_startup_waits_unless_told_to_fail_open() {
    let loopback: IpAddr = [127, 0, 0, 1].into();
    let dir = tempfile::tempdir().unwrap();

    // Fail closed (the default): neither /readyz nor /startupz reports ready.
    let closed = SocketAddr::new(loopback, free_addr().port());
    let _closed = without_operator(&dir.path().join("closed"), closed, &[]);
    for path in ["/readyz", "/startupz"] {
        let (status, body) = answer(loopback, closed, path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert!(body.contains("no policy revision"), "{body}");
    }

    // Fail open after a bound: /startupz reports started once it passed, /readyz still not.
    let open = SocketAddr::new(loopback, free_addr().port());
    let mut sidecar = without_operator(
        &dir.path().join("open"),
        open,
        &["--startup-fail-open-after=1s"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = answer(loopback, open, "/startupz").await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "/startupz never opened: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("without a policy revision"), "{body}");
    let (status, _) = answer(loopback, open, "/readyz").await;
    assert_eq!(status, 503, "/readyz stays honest");
    // The choice is logged.
    sidecar.start_kill().unwrap();
    let out = sidecar.wait_with_output().await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("--startup-fail-open-after"), "{log}");

    // Still closed for the sidecar without the flag.
    let (status, _) = answer(loopback, closed, "/startupz").await;
    assert_eq!(status, 503);
}
