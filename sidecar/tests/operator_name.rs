//! The operator's name as the injector writes it: fully qualified with a trailing dot (never
//! expanded through the pod's DNS search path). Its certificate names it without the dot.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The first `disconnected from the operator` error of a cluster-mode sidecar that verifies
/// the operator's certificate against `server_name`.
async fn first_error(server_name: &str) -> String {
    let ca = TestCa::new();
    let operator = Partner::start_tls(&ca).await;
    let port = operator.url().rsplit(':').next().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &ca.ca_pem).unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--operator")
        .arg(format!("https://127.0.0.1:{port}"))
        .arg("--operator-server-name")
        .arg(server_name)
        .arg("--operator-ca")
        .arg(dir.path().join("ca.crt"))
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .arg("--state-file")
        .arg(dir.path().join("snapshot.json"))
        .args(["--pod-name", "app-0", "--pod-namespace", "payments"])
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("the sidecar reports its connection within 20s")
            .unwrap()
            .expect("the sidecar runs");
        if line.contains("disconnected from the operator") {
            return line;
        }
    }
}

#[tokio::test]
async fn an_absolute_name_verifies_against_the_certificates_name() {
    // The stand-in operator speaks HTTP/1.1, so the subscription fails after the handshake.
    let absolute = first_error("localhost.").await;
    assert!(!absolute.contains("TLS"), "{absolute}");
    // Control: a name the certificate does not carry fails the handshake.
    let other = first_error("elsewhere.example.").await;
    assert!(other.contains("TLS"), "{other}");
}
